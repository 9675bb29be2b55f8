"""fal-ai/stable-cascade/sote-diffusion's schema, field by field, against ../shared/fal-schemas.md §2."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from ember.endpoints.common import IMAGE_SIZE_PRESETS, InputError, StoredImage
from ember.endpoints.sote_diffusion.schema import SoteDiffusionInput, SoteDiffusionOutput
from ember.endpoints.sote_diffusion.translate import SoteDiffusionEndpoint

DEFAULTS = {
    "negative_prompt": "",
    "first_stage_steps": 25,
    "second_stage_steps": 10,
    "guidance_scale": 8,
    "second_stage_guidance_scale": 2,
    "seed": None,
    "enable_safety_checker": True,
    "num_images": 1,
    "sync_mode": False,
}


def test_every_field_and_default() -> None:
    inp = SoteDiffusionInput(prompt="a cat")
    assert set(SoteDiffusionInput.model_fields) == set(DEFAULTS) | {"prompt", "image_size"}
    for name, value in DEFAULTS.items():
        assert getattr(inp, name) == value, name
    assert (inp.image_size.width, inp.image_size.height) == (1024, 1536)
    schema = SoteDiffusionInput.model_json_schema()
    assert schema["required"] == ["prompt"] and schema["title"] == "SoteDiffusionInput"
    assert schema["properties"]["image_size"]["default"] == {"width": 1024, "height": 1536}
    out = SoteDiffusionOutput.model_json_schema()
    assert set(out["required"]) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}


@pytest.mark.parametrize(
    "field, bad, good",
    [
        ("first_stage_steps", [3, 51], [4, 50]),
        ("second_stage_steps", [3, 25], [4, 24]),
        ("guidance_scale", [-0.1, 20.5], [0, 20]),
        ("second_stage_guidance_scale", [-1, 21], [0, 20]),
        ("num_images", [0, 5], [1, 4]),
        ("image_size", ["square_xl", {"width": 0}, {"height": 14143}], list(IMAGE_SIZE_PRESETS)),
        ("seed", [-1, 2**63, "abc"], [0, 2**63 - 1]),
    ],
)
def test_ranges_and_enums(field: str, bad: list, good: list) -> None:
    for value in bad:
        with pytest.raises(ValidationError) as info:
            SoteDiffusionInput(prompt="x", **{field: value})
        assert info.value.errors()[0]["loc"][0] == field
    for value in good:
        SoteDiffusionInput(prompt="x", **{field: value})


def test_sizes_follow_stable_cascades_128_px_rule() -> None:
    endpoint = SoteDiffusionEndpoint()
    assert endpoint.size(SoteDiffusionInput(prompt="x")) == (1024, 1536)
    assert endpoint.size(SoteDiffusionInput(prompt="x", image_size="square_hd")) == (1024, 1024)
    assert endpoint.size(SoteDiffusionInput(prompt="x", image_size="portrait_4_3")) == (768, 1024)
    with pytest.raises(InputError) as info:
        endpoint.check(SoteDiffusionInput(prompt="x", image_size={"width": 1000, "height": 1536}))
    assert info.value.loc == ("body", "image_size", "width") and "multiple of 128" in info.value.msg
    with pytest.raises(InputError) as info:  # 576 px sides: Stable Cascade would return 596 px
        endpoint.check(SoteDiffusionInput(prompt="x", image_size="landscape_16_9"))
    assert info.value.loc == ("body", "image_size")
    with pytest.raises(InputError):
        endpoint.check(SoteDiffusionInput(prompt="x", image_size={"width": 128, "height": 128}))


def test_tensors_and_output() -> None:
    endpoint = SoteDiffusionEndpoint()
    inp = SoteDiffusionInput(prompt="p", negative_prompt="n", num_images=2, enable_safety_checker=False)
    t = endpoint.to_triton(inp, seed=42)
    assert {k: v.shape for k, v in t.items()} == {k: (1, 1) for k in t}
    assert t["SEED"].dtype == np.int64 and t["SEED"][0, 0] == 42
    assert (t["WIDTH"][0, 0], t["HEIGHT"][0, 0]) == (1024, 1536)
    assert (t["FIRST_STAGE_STEPS"][0, 0], t["SECOND_STAGE_STEPS"][0, 0]) == (25, 10)
    assert t["ENABLE_SAFETY_CHECKER"].dtype == np.bool_ and not t["ENABLE_SAFETY_CHECKER"][0, 0]

    async def store(image: np.ndarray, fmt: str) -> StoredImage:
        assert fmt == "jpeg"
        return StoredImage(
            url="https://files/x.jpg",
            content_type="image/jpeg",
            width=image.shape[1],
            height=image.shape[0],
            file_name="x.jpg",
            file_size=1,
        )

    outputs = {
        "IMAGES": np.zeros((1, 2, 1536, 1024, 3), np.uint8),
        "NSFW": np.array([[False, True]]),
        "TIMINGS": np.array([[b'{"total": 1.5}']], dtype=np.object_),
    }
    out = asyncio.run(endpoint.to_output(inp, 42, outputs, store)).model_dump()
    assert out["seed"] == 42 and out["prompt"] == "p" and out["has_nsfw_concepts"] == [False, True]
    assert out["timings"] == {"total": 1.5}
    assert out["images"][0] == {
        "url": "https://files/x.jpg",
        "width": 1024,
        "height": 1536,
        "content_type": "image/jpeg",
    }
