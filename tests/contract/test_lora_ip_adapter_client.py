"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver: fal-ai/lora's ip_adapter with the
image as a data URI (decoded by the gateway, sent in MEDIA) and the adapter + its image encoder as a
directory under the model root (EMBER_LORA_MODEL_ROOT). The served image matches diffusers'
load_ip_adapter pipeline; the next request without IP-Adapter is the same as the one before it."""

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
from tests.contract.test_lora_python_client import ENDPOINT, tiny_model  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

ARGS = {
    "prompt": "a red fox",
    "negative_prompt": "blurry",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "image_format": "png",
    "seed": 9,
}


@pytest.fixture(scope="module")
def adapter_dir(stack_settings: Settings, tiny_model: str) -> Path:  # noqa: F811 - the imported fixture
    from ember.specs.demo_ip_adapter import build_tiny_ip_adapter

    directory = stack_settings.lora_models_dir / "tiny-ip-adapter"
    if not (directory / "models" / "image_encoder" / "config.json").is_file():
        build_tiny_ip_adapter(directory, Path(tiny_model))
    return directory.resolve()


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


def _reference(model: str, adapter: Path, image: np.ndarray) -> np.ndarray:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ember.specs.demo_ip_adapter import SUBFOLDER, WEIGHT_NAME

    encoder = CLIPVisionModelWithProjection.from_pretrained(adapter / SUBFOLDER / "image_encoder")
    size = encoder.config.image_size
    pipe = StableDiffusionPipeline.from_pretrained(
        model,
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(
        str(adapter), subfolder=SUBFOLDER, weight_name=WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(0.8)
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


def test_ip_adapter_through_fal_client(
    fal_client: ModuleType,
    client_env,
    tiny_model: str,  # noqa: F811 - the imported fixture
    adapter_dir: Path,
) -> None:
    cafile = client_env["SSL_CERT_FILE"]
    args = {**ARGS, "model_name": tiny_model}
    image = _image()
    adapter = {
        "ip_adapter_image_url": _data_uri(image),
        "path": str(adapter_dir),
        "model_subfolder": "models",
        "weight_name": "ip-adapter_sd15.safetensors",
        "scale": 0.8,
    }
    before = _pixels(fal_client.run(ENDPOINT, arguments=args), cafile)
    with_ip = fal_client.run(ENDPOINT, arguments={**args, "ip_adapter": [adapter]})
    after = _pixels(fal_client.run(ENDPOINT, arguments=args), cafile)
    served = _pixels(with_ip, cafile)
    assert with_ip["seed"] == ARGS["seed"]
    # Same float32 CPU kernels in Triton's stub and here, other thread counts: at most 1 level apart.
    assert np.abs(served - _reference(tiny_model, adapter_dir, image)).max() <= 1
    assert np.abs(served - before).max() > 8, "the image prompt must change the image"
    assert np.array_equal(before, after), "a request without IP-Adapter changed after one with it"


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"insight_face_model_path": "buffalo_l"}, ["body", "ip_adapter", 0, "insight_face_model_path"]),
        ({"weight_name": "ip-adapter_sd15.bin"}, ["body", "ip_adapter", 0, "weight_name"]),
        ({"path": "/etc"}, ["body", "ip_adapter", 0, "path"]),
        ({"model_subfolder": "../../.."}, ["body", "ip_adapter", 0, "model_subfolder"]),
    ],
)
def test_refused_ip_adapter_fields_are_422(
    fal_client: ModuleType,
    tiny_model: str,  # noqa: F811 - the imported fixture
    adapter_dir: Path,
    change: dict,
    loc: list,
) -> None:
    adapter = {
        "ip_adapter_image_url": _data_uri(_image()),
        "path": str(adapter_dir),
        "model_subfolder": "models",
        "weight_name": "ip-adapter_sd15.safetensors",
        **change,
    }
    args = {**ARGS, "model_name": tiny_model, "ip_adapter": [adapter]}
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=args)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"][: len(loc)] == loc for d in detail), detail
