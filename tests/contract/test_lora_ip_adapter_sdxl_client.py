"""fal-client, unmodified, against the real gateway + tritonserver: fal-ai/lora's ip_adapter on an SDXL base
directory under the model root. The adapter is the tiny ip-adapter-plus_sdxl_vit-h (sdxl_models/, as in
h94/IP-Adapter) with its ViT-H encoder named the way fal users name it (image_encoder_path +
image_encoder_subfolder "models/image_encoder"); the served image matches diffusers'
StableDiffusionXLPipeline.load_ip_adapter, the next plain request equals the one before, and an SD1.5
adapter on the SDXL base is a 422 naming ip_adapter."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ember.settings import Settings

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"
ARGS = {
    "prompt": "a red fox",
    "negative_prompt": "blurry",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "image_format": "png",
    "seed": 11,
}


@pytest.fixture(scope="module")
def dirs(stack_settings: Settings) -> tuple[Path, Path]:
    """(the tiny SDXL base, the tiny SDXL IP-Adapter directory), this module's own copies."""
    from ember.specs.demo_ip_adapter import build_tiny_ip_adapter_sdxl
    from ember.specs.demo_sdxl import build_tiny_sdxl

    xl = stack_settings.lora_models_dir / "tiny-sdxl-base-ip-client"
    if not (xl / "model_index.json").is_file():
        build_tiny_sdxl(xl)
    ip = stack_settings.lora_models_dir / "tiny-ip-adapter-sdxl-client"
    if not (ip / "models" / "image_encoder" / "config.json").is_file():
        build_tiny_ip_adapter_sdxl(ip, xl)
    return xl.resolve(), ip.resolve()


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def _data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)


def _reference(xl: Path, ip: Path, image: np.ndarray) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ember.specs.demo_ip_adapter import XL_PLUS_WEIGHT_NAME, XL_SUBFOLDER

    encoder = CLIPVisionModelWithProjection.from_pretrained(ip / "models" / "image_encoder")
    size = encoder.config.image_size
    pipe = StableDiffusionXLPipeline.from_pretrained(
        xl,
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        add_watermarker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(
        str(ip), subfolder=XL_SUBFOLDER, weight_name=XL_PLUS_WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(0.7)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=ARGS["prompt"],
        negative_prompt=ARGS["negative_prompt"],
        ip_adapter_image=Image.fromarray(image),
        height=64,
        width=64,
        num_inference_steps=ARGS["num_inference_steps"],
        guidance_scale=ARGS["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(ARGS["seed"]),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.int16)


def test_sdxl_ip_adapter_plus_through_fal_client(
    fal_client: ModuleType, client_env, dirs: tuple[Path, Path]
) -> None:
    xl, ip = dirs
    cafile = client_env["SSL_CERT_FILE"]
    args = {**ARGS, "model_name": str(xl)}
    image = _image()
    adapter = {
        "ip_adapter_image_url": _data_uri(image),
        "path": str(ip),
        "model_subfolder": "sdxl_models",
        "weight_name": "ip-adapter-plus_sdxl_vit-h.safetensors",
        "scale": 0.7,
    }
    encoder = {"image_encoder_path": str(ip), "image_encoder_subfolder": "models/image_encoder"}
    before = _pixels(fal_client.run(ENDPOINT, arguments=args), cafile)
    with_ip = fal_client.run(ENDPOINT, arguments={**args, "ip_adapter": [adapter], **encoder})
    after = _pixels(fal_client.run(ENDPOINT, arguments=args), cafile)
    served = _pixels(with_ip, cafile)
    assert with_ip["seed"] == ARGS["seed"]
    # Same float32 CPU kernels in Triton's stub and here, other thread counts: at most 1 level apart.
    assert np.abs(served - _reference(xl, ip, image)).max() <= 1
    assert np.abs(served - before).max() > 8, "the image prompt must change the image"
    assert np.array_equal(before, after), "a request without IP-Adapter changed after one with it"


def test_sd15_adapter_on_sdxl_base_is_422(
    fal_client: ModuleType, stack_settings: Settings, dirs: tuple[Path, Path]
) -> None:
    from ember.specs.demo_ip_adapter import build_tiny_ip_adapter
    from ember.specs.demo_lora import build_tiny_sd15

    root = stack_settings.lora_models_dir
    sd15_ip = root / "tiny-ip-adapter-sd15-for-xl-client"
    if not (sd15_ip / "models" / "image_encoder" / "config.json").is_file():
        sd15 = root / "tiny-sd15-for-xl-ip-client"
        if not (sd15 / "model_index.json").is_file():
            build_tiny_sd15(sd15)
        build_tiny_ip_adapter(sd15_ip, sd15)
    adapter = {
        "ip_adapter_image_url": _data_uri(_image()),
        "path": str(sd15_ip.resolve()),
        "model_subfolder": "models",
        "weight_name": "ip-adapter_sd15.safetensors",
    }
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments={**ARGS, "model_name": str(dirs[0]), "ip_adapter": [adapter]})
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any("ip_adapter" in d["msg"] and "SDXL" in d["msg"] for d in detail), detail
