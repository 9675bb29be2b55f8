"""fal-ai/pixart-sigma's schema (fal-schemas.md §4) and its translation to the Triton model's tensors."""

from __future__ import annotations

import asyncio
import json
import typing

import numpy as np
import pytest
from pydantic import ValidationError

from ember.endpoints.common import InputError, StoredImage
from ember.endpoints.pixart_sigma.schema import PixArtSigmaInput, PixArtSigmaOutput, Style
from ember.endpoints.pixart_sigma.translate import PixArtSigmaEndpoint
from ember.endpoints.registry import ENDPOINTS

SEED_EXAMPLE = {
    "prompt": "Photorealistic closeup video of two pirate ships battling each other as they sail inside a cup "
    "of coffee.",
    "negative_prompt": "cartoon, illustration, animation. face. male, female",
    "style": "(No style)",
    "image_size": "square_hd",
    "num_inference_steps": 35,
    "scheduler": "DPM-SOLVER",
    "guidance_scale": 4.5,
    "num_images": 1,
}


def test_defaults_are_fals() -> None:
    inp = PixArtSigmaInput(prompt="x")
    assert inp.negative_prompt == "" and inp.style == "(No style)" and inp.image_size == "square_hd"
    assert (inp.num_inference_steps, inp.scheduler, inp.guidance_scale) == (35, "DPM-SOLVER", 4.5)
    assert inp.seed is None and inp.sync_mode is False and inp.num_images == 1
    assert inp.enable_safety_checker is False
    schema = PixArtSigmaInput.model_json_schema()
    assert schema["required"] == ["prompt"]
    assert list(schema["properties"]) == [
        "prompt", "negative_prompt", "style", "image_size", "num_inference_steps", "scheduler",
        "guidance_scale", "seed", "sync_mode", "num_images", "enable_safety_checker",
    ]  # fmt: skip
    assert PixArtSigmaOutput.model_json_schema()["required"] == [
        "images", "timings", "seed", "has_nsfw_concepts", "prompt"
    ]  # fmt: skip


def test_style_enum_is_exact_and_matches_the_pipeline_templates() -> None:
    from ember.pipeline.pixart_styles import STYLES

    names = list(typing.get_args(Style))
    assert names == [
        "(No style)", "Cinematic", "Photographic", "Anime", "Manga", "Digital Art", "Pixel art",
        "Fantasy art", "Neonpunk", "3D Model",
    ]  # fmt: skip
    assert names == list(STYLES)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_inference_steps", 4), ("num_inference_steps", 51), ("guidance_scale", 0.5),
        ("guidance_scale", 10.5), ("num_images", 0), ("num_images", 9), ("style", "cinematic"),
        ("scheduler", "dpm-solver"), ("image_size", "square_xl"), ("seed", -1),
    ],
)  # fmt: skip
def test_out_of_range_is_a_validation_error(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        PixArtSigmaInput(prompt="x", **{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_seed_example_translates_to_typed_tensors() -> None:
    endpoint = ENDPOINTS["fal-ai/pixart-sigma"]
    assert isinstance(endpoint, PixArtSigmaEndpoint) and endpoint.triton_model == "pixart_sigma"
    inp = PixArtSigmaInput(**SEED_EXAMPLE)
    endpoint.check(inp)
    tensors = endpoint.to_triton(inp, seed=123)
    assert all(t.shape == (1, 1) for t in tensors.values())
    assert (tensors["WIDTH"][0, 0], tensors["HEIGHT"][0, 0]) == (1024, 1024)
    assert tensors["SEED"].dtype == np.int64 and tensors["SEED"][0, 0] == 123
    assert tensors["NUM_INFERENCE_STEPS"][0, 0] == 35 and tensors["GUIDANCE_SCALE"][0, 0] == np.float32(4.5)
    assert tensors["STYLE"][0, 0] == b"(No style)" and tensors["SCHEDULER"][0, 0] == b"DPM-SOLVER"
    assert tensors["ENABLE_SAFETY_CHECKER"].dtype == np.bool_ and not tensors["ENABLE_SAFETY_CHECKER"][0, 0]
    assert tensors["NEGATIVE_PROMPT"][0, 0] == SEED_EXAMPLE["negative_prompt"].encode()

    from ember.pipeline.pixart_io import INPUT_NAMES

    assert set(tensors) == set(INPUT_NAMES)


@pytest.mark.parametrize(
    ("size", "loc"),
    [({"width": 520, "height": 512}, ("body", "image_size", "width")),
     ({"width": 512, "height": 32}, ("body", "image_size", "height")),
     ({"width": 4096, "height": 1024}, ("body", "image_size", "width"))],
)  # fmt: skip
def test_sizes_the_model_cannot_render_are_refused_by_name(
    size: dict[str, int], loc: tuple[str, ...]
) -> None:
    with pytest.raises(InputError) as info:
        PixArtSigmaEndpoint().check(PixArtSigmaInput(prompt="x", image_size=size))
    assert info.value.loc == loc


def test_output_is_file_style_png_images() -> None:
    async def store(image: np.ndarray, fmt: str) -> StoredImage:
        assert fmt == "png"
        h, w = image.shape[:2]
        return StoredImage(f"https://files/x.{fmt}", "image/png", "x.png", 42, w, h)

    outputs = {
        "IMAGES": np.zeros((1, 2, 32, 48, 3), np.uint8),
        "NSFW": np.array([[False, True]]),
        "TIMINGS": np.array([[json.dumps({"total": 1.5}).encode()]], dtype=object),
    }
    inp = PixArtSigmaInput(prompt="a cat", style="Anime")
    out = asyncio.run(PixArtSigmaEndpoint().to_output(inp, 9, outputs, store)).model_dump()
    assert out["images"][0] == {"url": "https://files/x.png", "content_type": "image/png", "file_name": "x.png",
                                "file_size": 42, "width": 48, "height": 32}  # fmt: skip
    assert out["has_nsfw_concepts"] == [False, True] and out["seed"] == 9 and out["prompt"] == "a cat"
    assert out["timings"] == {"total": 1.5}
