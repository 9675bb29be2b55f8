"""fal-ai/lcm's schema, field by field, against ../shared/fal-schemas.md §5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ember.endpoints.common import IMAGE_SIZE_PRESETS, InputError, resolve_image_size
from ember.endpoints.lcm.schema import LcmInput, LcmOutput
from ember.endpoints.lcm.translate import LcmEndpoint

DEFAULTS = {
    "model": "sdv1-5", "image_url": None, "mask_url": None, "strength": 0.8, "negative_prompt": "",
    "seed": None, "guidance_scale": 1, "num_inference_steps": 4, "image_size": None, "sync_mode": False,
    "num_images": 1, "enable_safety_checks": True, "request_id": "", "inpaint_mask_only": False,
    "controlnet_inpaint": False, "lora_url": None, "lora_scale": 1,
}


def test_every_field_and_default() -> None:
    inp = LcmInput(prompt="a cat")
    assert set(LcmInput.model_fields) == set(DEFAULTS) | {"prompt"}
    for name, value in DEFAULTS.items():
        assert getattr(inp, name) == value, name
    assert LcmInput.model_json_schema()["required"] == ["prompt"]


@pytest.mark.parametrize(
    "field, bad, good",
    [
        ("strength", [-0.1, 1.01], [0, 1]),
        ("guidance_scale", [-1, 8.5], [0, 8]),
        ("num_inference_steps", [0, 13], [1, 12]),
        ("num_images", [0, 9], [1, 8]),
        ("model", ["sd2", ""], ["sdxl", "sdv1-5"]),
        ("image_size", ["square_xl", {"width": 0}, {"width": 14143}], list(IMAGE_SIZE_PRESETS) + [{"width": 64, "height": 64}]),
        ("seed", [-1, 2**63, "abc"], [0, 2**63 - 1]),
    ],
)
def test_ranges_and_enums(field: str, bad: list, good: list) -> None:
    for value in bad:
        with pytest.raises(ValidationError) as info:
            LcmInput(prompt="x", **{field: value})
        assert info.value.errors()[0]["loc"][0] == field
    for value in good:
        LcmInput(prompt="x", **{field: value})


def test_image_size_resolution() -> None:
    assert resolve_image_size(None, (512, 512)) == (512, 512)
    assert resolve_image_size("landscape_16_9", (512, 512)) == (1024, 576)
    custom = LcmInput(prompt="x", image_size={"width": 640, "height": 384}).image_size
    assert resolve_image_size(custom, (512, 512)) == (640, 384)
    with pytest.raises(InputError) as info:
        resolve_image_size(LcmInput(prompt="x", image_size={"width": 100, "height": 64}).image_size, (512, 512))
    assert info.value.loc == ("body", "image_size", "width")
    with pytest.raises(InputError):
        resolve_image_size(LcmInput(prompt="x", image_size={"width": 4096, "height": 4096}).image_size, (512, 512))


def test_controlnet_inpaint_is_sent_with_the_mask_for_sd15_only() -> None:
    image, mask = np.zeros((40, 56, 3), np.uint8), np.zeros((40, 56), np.uint8)
    inp = LcmInput(prompt="x", image_url="https://x/i.png", mask_url="https://x/m.png", controlnet_inpaint=True)
    LcmEndpoint().check(inp)
    assert LcmEndpoint().to_triton(inp, 1, {"image": image, "mask": mask})["CONTROLNET_INPAINT"].tolist() == [[True]]
    plain = inp.model_copy(update={"controlnet_inpaint": False})
    assert LcmEndpoint().to_triton(plain, 1, {"image": image, "mask": mask})["CONTROLNET_INPAINT"].tolist() == [[False]]
    # without a mask it has no effect (fal: "only effective for inpainting"): noted, not sent
    no_mask = inp.model_copy(update={"mask_url": None})
    assert "CONTROLNET_INPAINT" not in LcmEndpoint().to_triton(no_mask, 1, {"image": image})
    text_only = inp.model_copy(update={"image_url": None, "mask_url": None})
    assert any("controlnet_inpaint" in note for note in LcmEndpoint().notes(text_only))
    with pytest.raises(InputError) as info:
        LcmEndpoint().check(inp.model_copy(update={"model": "sdxl"}))
    assert info.value.loc == ("body", "controlnet_inpaint") and "sdv1-5" in info.value.msg


def test_mask_without_image_is_refused_at_mask_url() -> None:
    with pytest.raises(InputError) as info:
        LcmEndpoint().check(LcmInput(prompt="x", mask_url="https://x/m.png"))
    assert info.value.loc == ("body", "mask_url") and "needs image_url" in info.value.msg


def test_image_modes_send_image_mask_and_no_size_unless_asked() -> None:
    image, mask = np.zeros((40, 56, 3), np.uint8), np.zeros((40, 56), np.uint8)
    inp = LcmInput(prompt="x", image_url="https://x/i.png", mask_url="https://x/m.png", strength=0.5,
                   inpaint_mask_only=True, enable_safety_checks=False)
    tensors = LcmEndpoint().to_triton(inp, 1, {"image": image, "mask": mask})
    assert tensors["IMAGE"].shape == (1, 40, 56, 3) and tensors["MASK"].shape == (1, 40, 56)
    assert tensors["STRENGTH"].tolist() == [[0.5]] and tensors["INPAINT_MASK_ONLY"].tolist() == [[True]]
    assert tensors["ENABLE_SAFETY_CHECKS"].tolist() == [[False]]
    assert "WIDTH" not in tensors and "HEIGHT" not in tensors  # the model takes the image's size
    sized = LcmEndpoint().to_triton(inp.model_copy(update={"image_size": "square"}), 1, {"image": image})
    assert sized["WIDTH"].tolist() == [[512]] and "MASK" not in sized


def test_to_triton_tensors_match_the_model_config() -> None:
    tensors = LcmEndpoint().to_triton(LcmInput(prompt="a cat", image_size="portrait_4_3", num_images=3), 42)
    assert tensors["WIDTH"].tolist() == [[768]] and tensors["HEIGHT"].tolist() == [[1024]]
    assert tensors["SEED"].dtype == np.int64 and tensors["NUM_IMAGES"].tolist() == [[3]]
    assert all(t.shape == (1, 1) for t in tensors.values())
    config = (Path(__file__).resolve().parents[2] / "model_repository/lcm/config.pbtxt").read_text()
    for name in tensors:
        assert f'name: "{name}"' in config


def test_output_shape() -> None:
    out = LcmOutput(images=[{"url": "u", "width": 1, "height": 1}], timings={"inference": 0.1}, seed=1,
                    nsfw_content_detected=[False])
    dumped = out.model_dump()
    assert dumped["images"][0]["content_type"] == "image/jpeg"
    assert dumped["num_inference_steps"] == 4 and dumped["request_id"] == ""


def test_sdxl_is_served_and_sent_as_model() -> None:
    """model="sdxl" passes the gateway's check and reaches the lcm model as MODEL; text-to-image without
    image_size gets fal's documented 512x512 for SDXL too."""
    inp = LcmInput(prompt="x", model="sdxl")
    LcmEndpoint().check(inp)
    tensors = LcmEndpoint().to_triton(inp, 1)
    assert tensors["MODEL"].tolist() == [[b"sdxl"]]
    assert tensors["WIDTH"].tolist() == [[512]] and tensors["HEIGHT"].tolist() == [[512]]
