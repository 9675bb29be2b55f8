"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver (fal-ai/lora), with `model_name`
pointing at a tiny SD1.5 directory under the allowed model root."""

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
from tests.contract.status_logs import log_messages

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"

# The seed document's example input (fal's docs for fal-ai/lora), verbatim but for model_name (a tiny
# local model: there is no hub here) and image_size/num_inference_steps (kept small for a 2-core CI).
SEED_EXAMPLE = {
    "model_name": "stabilityai/stable-diffusion-xl-base-1.0",
    "prompt": "Photo of a european medieval 40 year old queen, silver hair, highly detailed face, detailed eyes, "
    "head shot, intricate crown, age spots, wrinkles",
    "negative_prompt": "cartoon, painting, illustration, worst quality, low quality, normal quality",
    "prompt_weighting": True,
    "loras": [],
    "embeddings": [],
    "controlnets": [],
    "ip_adapter": [],
    "image_encoder_weight_name": "pytorch_model.bin",
    "image_size": "square_hd",
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "timesteps": {"method": "default", "array": []},
    "sigmas": {"method": "default", "array": []},
    "image_format": "jpeg",
    "num_images": 1,
    "tile_width": 4096,
    "tile_height": 4096,
    "tile_stride_width": 2048,
    "tile_stride_height": 2048,
}


@pytest.fixture(scope="module")
def tiny_model(stack_settings: Settings) -> str:
    from ember.specs.demo_lora import build_tiny_sd15

    directory = stack_settings.lora_models_dir / "tiny-sd15"
    if not (directory / "model_index.json").is_file():
        build_tiny_sd15(directory)
    return str(directory.resolve())


@pytest.fixture(scope="module")
def first_use_model(stack_settings: Settings) -> str:
    """A model no other test names (other modules share `tiny_model`): the seed example's request is the
    one that loads it, so its status logs must say so."""
    from ember.specs.demo_lora import build_tiny_sd15

    directory = stack_settings.lora_models_dir / "tiny-sd15-first-use"
    build_tiny_sd15(directory)
    return str(directory.resolve())


def _download(url: str, cafile: str) -> Image.Image:
    response = httpx.get(url, verify=cafile, timeout=30)
    response.raise_for_status()
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_seed_example_through_fal_client(fal_client: ModuleType, client_env, first_use_model: str) -> None:
    arguments = {
        **SEED_EXAMPLE,
        "model_name": first_use_model,
        "image_size": {"width": 128, "height": 96},
        "num_inference_steps": 4,
        "seed": 11,
    }
    updates = []
    result = fal_client.subscribe(
        ENDPOINT, arguments=arguments, with_logs=True, on_queue_update=updates.append
    )
    (image,) = result["images"]
    assert (image["width"], image["height"]) == (128, 96)
    assert image["content_type"] == "image/jpeg" and image["file_name"].endswith(".jpg")
    downloaded = _download(image["url"], client_env["SSL_CERT_FILE"])
    assert downloaded.size == (128, 96) and downloaded.format == "JPEG"
    assert result["seed"] == 11
    assert result["has_nsfw_concepts"] == [False]
    # Always serialized, null when not requested (older schemas optional, newer required).
    assert "debug_latents" in result and result["debug_latents"] is None
    assert "debug_per_pass_latents" in result and result["debug_per_pass_latents"] is None
    messages = log_messages(fal_client, updates)
    assert any("/" in m and "step" in m.lower() for m in messages), messages
    # The base model loaded on this first request, and its status logs said so (LOG responses -> log lines).
    assert any(m.startswith("loading base model") for m in messages), messages


def _lora_data_uri(model: str, tmp_path: Path) -> str:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True
    )
    data = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def test_lora_changes_the_image_and_png(
    fal_client: ModuleType, client_env, tiny_model: str, tmp_path
) -> None:
    args = {
        "model_name": tiny_model,
        "prompt": "a red fox",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "seed": 5,
        "scheduler": "Euler A",
        "image_format": "png",
    }
    plain = fal_client.run(ENDPOINT, arguments=args)
    with_lora = fal_client.run(
        ENDPOINT, arguments={**args, "loras": [{"path": _lora_data_uri(tiny_model, tmp_path), "scale": 1.5}]}
    )
    again = fal_client.run(ENDPOINT, arguments=args)
    a, b, c = (
        np.asarray(_download(r["images"][0]["url"], client_env["SSL_CERT_FILE"]))
        for r in (plain, with_lora, again)
    )
    assert plain["images"][0]["content_type"] == "image/png"
    assert not np.array_equal(a, b)
    assert np.array_equal(a, c), "the base weights were not restored after the LoRA request"
    checked = fal_client.run(ENDPOINT, arguments={**args, "enable_safety_checker": True, "num_images": 2})
    assert len(checked["images"]) == 2 and all(isinstance(f, bool) for f in checked["has_nsfw_concepts"])
    assert len(checked["has_nsfw_concepts"]) == 2


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"model_name": "/etc"}, ["body", "model_name"]),
        ({"model_name": "../../etc/passwd"}, ["body", "model_name"]),
        (
            {
                "controlnets": [
                    {"path": "https://example.com/cn.safetensors", "image_url": "https://example.com/a.png"}
                ]
            },
            ["body", "controlnets"],
        ),
        (
            {"ip_adapter": [{"ip_adapter_image_url": "https://example.com/a.png", "path": "x"}]},
            ["body", "ip_adapter"],
        ),
        ({"ic_light_model_url": "https://example.com/ic.safetensors"}, ["body", "ic_light_image_url"]),
        (
            {"debug_per_pass_latents": True, "num_images": 8, "num_inference_steps": 150,
             "image_size": {"width": 2048, "height": 2048}},
            ["body", "debug_per_pass_latents"],
        ),
        ({"scheduler": "Heun"}, ["body", "scheduler"]),
        ({"num_inference_steps": 151}, ["body", "num_inference_steps"]),
        ({"loras": [{"path": "/etc/passwd"}]}, ["body", "loras", 0, "path"]),
    ],
)
def test_refused_inputs_are_422(fal_client: ModuleType, tiny_model: str, change: dict, loc: list) -> None:
    args = {"model_name": tiny_model, "prompt": "x", "image_size": {"width": 64, "height": 64}, **change}
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=args)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"][: len(loc)] == loc for d in detail), detail
