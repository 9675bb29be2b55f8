"""fal-client, unmodified, against the real gateway + tritonserver (fal-ai/lora): `unet_name` as an http URL
of a single-file UNet (the tiny SD1.5 UNet of another seed in the original LDM layout, UNet tensors only),
served by a local HTTP server the gateway may fetch from (EMBER_FETCH_ALLOW=127.0.0.1/32 in the stack):
the same image as that UNet's diffusers directory; a file without UNet tensors is 422 at unet_name."""

from __future__ import annotations

import io
from collections.abc import Iterator
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from ember.settings import Settings
from tests.contract.conftest import static_server
from tests.single_file_checkpoint import UNET_PREFIX, to_single_file

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"


@pytest.fixture(scope="module")
def served(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from ember.specs.demo_lora import build_tiny_sd15

    root = stack_settings.lora_models_dir
    base, other = root / "tiny-sd15-unet-name", root / "tiny-sd15-unet-name-other"
    for path, seed in ((base, 0), (other, 1)):
        if not (path / "model_index.json").is_file():
            build_tiny_sd15(path, seed=seed)
    files = tmp_path_factory.mktemp("http")
    full = to_single_file(other, files / "full.safetensors")
    unet = {k: v for k, v in load_file(str(full)).items() if k.startswith(UNET_PREFIX)}
    save_file(unet, str(files / "unet.safetensors"))
    text_only = {k: v for k, v in load_file(str(full)).items() if k.startswith("cond_stage_model.")}
    save_file(text_only, str(files / "text.safetensors"))
    with static_server(files) as url:
        yield {
            "base": str(base.resolve()),
            "unet_dir": str((other / "unet").resolve()),
            "unet_url": f"{url}/unet.safetensors",
            "text_url": f"{url}/text.safetensors",
        }


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_single_file_unet_url(fal_client: ModuleType, client_env, served: dict[str, str]) -> None:
    args = {
        "model_name": served["base"],
        "prompt": "a red fox",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "seed": 5,
        "image_format": "png",
    }
    from_url = fal_client.run(ENDPOINT, arguments={**args, "unet_name": served["unet_url"]})
    from_dir = fal_client.run(ENDPOINT, arguments={**args, "unet_name": served["unet_dir"]})
    cafile = client_env["SSL_CERT_FILE"]
    assert np.array_equal(_pixels(from_url, cafile), _pixels(from_dir, cafile))

    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments={**args, "unet_name": served["text_url"]})
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"] == ["body", "unet_name"] and "not a UNet weight file" in d["msg"] for d in detail), (
        detail
    )
