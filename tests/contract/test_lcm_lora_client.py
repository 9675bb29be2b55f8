"""fal-client, unmodified, sending fal-ai/lcm `lora_url` (a data URI of a tiny random LoRA .safetensors in
diffusers' format) and `lora_scale` through the real gateway + tritonserver."""

from __future__ import annotations

import base64
import io
import pickle
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from ember.settings import Settings

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lcm"
ARGS = {
    "prompt": "a black cat with glowing eyes",
    "seed": 3,
    "image_size": {"width": 128, "height": 128},
    "num_inference_steps": 2,
    "enable_safety_checks": False,
    "sync_mode": True,
}


def _bytes_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def lora_url(
    stack_settings: Settings, fal_client: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A LoRA for the stack's own demo LCM model (built by the launcher before the stack started)."""
    from tests.pipeline.tiny_lora import make_lora

    source = stack_settings.model_source("lcm", "sdv1-5")
    return _bytes_uri(make_lora(source, tmp_path_factory.mktemp("lcm-lora"), seed=1).read_bytes())


def _image(fal_client: ModuleType, **extra: object) -> np.ndarray:
    result = fal_client.run(ENDPOINT, arguments={**ARGS, **extra})
    url = result["images"][0]["url"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).astype(int)


def test_lora_url_and_scale(fal_client: ModuleType, lora_url: str) -> None:
    base = _image(fal_client)
    fused = _image(fal_client, lora_url=lora_url, lora_scale=0.8)
    assert np.abs(fused - base).mean() > 2, "the LoRA did not reach the image"
    # The base comes back exactly after a LoRA request, and the LoRA image is reproducible.
    assert np.array_equal(_image(fal_client), base)
    assert np.array_equal(_image(fal_client, lora_url=lora_url, lora_scale=0.8), fused)
    # lora_scale is the fuse scale: 0 adds nothing (W + 0 * BA = W), so the image is the base's.
    assert np.array_equal(_image(fal_client, lora_url=lora_url, lora_scale=0.0), base)


def test_a_pickle_as_lora_url_is_422(fal_client: ModuleType) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments={**ARGS, "lora_url": _bytes_uri(pickle.dumps({"w": [1.0]}))})
    assert info.value.status_code == 422
    assert info.value.response.json()["detail"][0]["loc"] == ["body", "lora_url"]
