"""fal-client, unmodified, against the real gateway + tritonserver (fal-ai/lora): `unet_name` on a tiny SDXL
base directory under the allowed model root. An SDXL UNet of other weights as a directory and as an http
URL of a single-file UNet (LDM names cut from an SGM checkpoint; a local HTTP server the gateway may fetch
from, EMBER_FETCH_ALLOW=127.0.0.1/32 in the stack) gives the same image, unlike the base's own UNet; an
SD1.5 UNet file on the SDXL base is a 422 naming unet_name."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ember.settings import Settings
from tests.contract.conftest import static_server
from tests.single_file_checkpoint import UNET_PREFIX, to_single_file_xl

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"


@pytest.fixture(scope="module")
def served(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from diffusers import UNet2DConditionModel

    from ember.specs.demo_lora import build_tiny_sd15
    from ember.specs.demo_sdxl import build_tiny_sdxl

    root = stack_settings.lora_models_dir
    base, unet_dir = root / "tiny-sdxl-unet-name", root / "tiny-sdxl-unet-name-unet"
    if not (base / "model_index.json").is_file():
        build_tiny_sdxl(base)
    if not (unet_dir / "config.json").is_file():
        torch.manual_seed(1)
        config = UNet2DConditionModel.load_config(base / "unet")
        UNet2DConditionModel.from_config(config).save_pretrained(unet_dir)
    files = tmp_path_factory.mktemp("http")
    with_unet = shutil.copytree(base, files / "with-unet", ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(unet_dir, with_unet / "unet")
    full = load_file(str(to_single_file_xl(with_unet, files / "sgm.safetensors")))
    save_file({k: v for k, v in full.items() if k.startswith(UNET_PREFIX)}, str(files / "unet.safetensors"))
    sd15 = build_tiny_sd15(files / "tiny-sd15")
    shutil.copy(next((sd15 / "unet").glob("*.safetensors")), files / "sd15-unet.safetensors")
    with static_server(files) as url:
        yield {
            "base": str(base.resolve()),
            "unet_dir": str(unet_dir.resolve()),
            "unet_url": f"{url}/unet.safetensors",
            "sd15_url": f"{url}/sd15-unet.safetensors",
        }


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_sdxl_unet_name(fal_client: ModuleType, client_env, served: dict[str, str]) -> None:
    args = {
        "model_name": served["base"],
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "seed": 5,
        "image_format": "png",
    }
    cafile = client_env["SSL_CERT_FILE"]
    from_dir = _pixels(fal_client.run(ENDPOINT, arguments={**args, "unet_name": served["unet_dir"]}), cafile)
    from_url = _pixels(fal_client.run(ENDPOINT, arguments={**args, "unet_name": served["unet_url"]}), cafile)
    base = _pixels(fal_client.run(ENDPOINT, arguments=args), cafile)
    assert np.array_equal(from_url, from_dir)
    assert np.abs(from_dir.astype(int) - base.astype(int)).max() > 1, "unet_name ignored"

    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments={**args, "unet_name": served["sd15_url"]})
    assert info.value.status_code == 422
    text = info.value.response.text
    assert "unet_name" in text and "SD1.5 UNet" in text, text
