"""fal-client, unmodified, through fal-ai/lora with `model_name` pointing at a tiny SDXL base directory under
the allowed model root (ember.pipeline.lora_xl): an image at the asked size, an SDXL LoRA (UNet and both
text encoders) that changes it and is undone for the next request, and the fields not served for SDXL
bases refused with a 422 naming them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image

from ember.settings import Settings

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"


@pytest.fixture(scope="module")
def tiny_xl(stack_settings: Settings) -> str:
    from ember.specs.demo_sdxl import build_tiny_sdxl

    directory = stack_settings.lora_models_dir / "tiny-sdxl-base-client"  # this module's own copy
    if not (directory / "model_index.json").is_file():
        build_tiny_sdxl(directory)
    return str(directory.resolve())


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_sdxl_base_with_and_without_lora(fal_client: ModuleType, client_env, tiny_xl: str, tmp_path: Path):
    from tests.pipeline.tiny_lora import make_xl_lora

    args = {
        "model_name": tiny_xl,
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "image_size": {"width": 96, "height": 64},
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "clip_skip": 1,
        "seed": 5,
        "scheduler": "DPM++ 2M",
        "image_format": "png",
    }
    plain = fal_client.run(ENDPOINT, arguments=args)
    lora = make_xl_lora(tiny_xl, tmp_path, seed=3).read_bytes()
    uri = "data:application/octet-stream;base64," + base64.b64encode(lora).decode()
    with_lora = fal_client.run(ENDPOINT, arguments={**args, "loras": [{"path": uri, "scale": 0.8}]})
    again = fal_client.run(ENDPOINT, arguments=args)
    a, b, c = (_pixels(r, client_env["SSL_CERT_FILE"]) for r in (plain, with_lora, again))
    assert a.shape == (64, 96, 3) and plain["images"][0]["content_type"] == "image/png"
    assert plain["seed"] == 5 and plain["has_nsfw_concepts"] == [False]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "the SDXL LoRA changed nothing"
    assert np.array_equal(a, c), "the base weights were not restored after the LoRA request"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt_weighting": True}, "prompt_weighting"),
        ({"embeddings": [{"path": "https://example.com/e.safetensors", "tokens": ["<e>"]}]}, "embeddings"),
        ({"unet_name": "owner/unet"}, "unet_name"),
    ],
)
def test_unserved_sdxl_fields_are_422(fal_client: ModuleType, tiny_xl: str, change: dict, field: str) -> None:
    args = {"model_name": tiny_xl, "prompt": "x", "image_size": {"width": 64, "height": 64}, **change}
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=args)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"][:2] == ["body", field] and "SDXL" in d["msg"] for d in detail), detail
