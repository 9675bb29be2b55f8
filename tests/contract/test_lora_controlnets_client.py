"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver: fal-ai/lora with `controlnets`
(a tiny ControlNet directory under the model root, control image and mask sent as data URIs) and
`controlnet_guess_mode`; bad ControlNet inputs are 422 at the field."""

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


def _data_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _rings() -> np.ndarray:
    y, x = np.mgrid[:80, :96]
    r = ((np.hypot(x - 48, y - 40) // 6) % 2 * 200 + 30).astype(np.uint8)
    return np.stack([r, r, np.full_like(r, 128)], axis=-1)


@pytest.fixture(scope="module")
def models(stack_settings: Settings) -> dict[str, str]:
    """An SD1.5-layout tiny base and a tiny ControlNet, as directories under the allowed model root."""
    from ember.specs.demo_controlnet import build_tiny_controlnet, build_tiny_sd15_base

    root = stack_settings.lora_models_dir
    base, controlnet = root / "tiny-sd15-controllable", root / "tiny-controlnet"
    if not (base / "model_index.json").is_file():
        build_tiny_sd15_base(base)
    if not (controlnet / "config.json").is_file():
        build_tiny_controlnet(controlnet)
    return {"base": str(base.resolve()), "controlnet": str(controlnet.resolve())}


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def _args(models: dict[str, str], **extra) -> dict:
    return {
        "model_name": models["base"],
        "prompt": "a castle on a hill",
        "image_size": {"width": 96, "height": 64},
        "num_inference_steps": 3,
        "seed": 5,
        "image_format": "png",
        **extra,
    }


def test_controlnets_through_fal_client(fal_client: ModuleType, client_env, models: dict[str, str]) -> None:
    mask = np.zeros((80, 96), np.uint8)
    mask[:, :48] = 255
    unit = {
        "path": models["controlnet"],
        "image_url": _data_uri(_rings()),
        "mask_url": _data_uri(mask),
        "conditioning_scale": 1.5,
        "end_percentage": 0.8,
    }
    cafile = client_env["SSL_CERT_FILE"]
    updates: list = []
    controlled = fal_client.subscribe(
        ENDPOINT, arguments=_args(models, controlnets=[unit]), with_logs=True, on_queue_update=updates.append
    )
    guessed = fal_client.run(
        ENDPOINT, arguments=_args(models, controlnets=[unit], controlnet_guess_mode=True)
    )
    plain = fal_client.run(ENDPOINT, arguments=_args(models))
    a, b, c = (_pixels(r, cafile) for r in (controlled, guessed, plain))
    assert a.shape == b.shape == c.shape == (64, 96, 3)
    assert (controlled["images"][0]["width"], controlled["images"][0]["height"]) == (96, 64)
    assert not np.array_equal(a, c) and not np.array_equal(a, b)
    messages = log_messages(fal_client, updates)
    assert any(m.startswith("loading ControlNet") for m in messages), messages  # first use, logged


@pytest.mark.parametrize(
    ("change", "loc", "says"),
    [
        ({"path": "/etc"}, ["body", "controlnets", 0, "path"], ""),
        ({"config_url": "https://example.com/config.json"}, ["body", "controlnets", 0, "config_url"], ""),
        ({"start_percentage": 0.9, "end_percentage": 0.1}, ["body", "controlnets", 0, "end_percentage"], ""),
        ({"mask_url": "MASK_OF_ANOTHER_SIZE"}, ["body", "controlnets", 0, "mask_url"], "size"),
        ({"path": "MISSING_DIRECTORY"}, ["body", "controlnets", 0, "path"], ""),
        # Found by the Triton model (no such weights file): 422 at the body, the message names the field.
        ({"variant": "fp16"}, ["body"], "controlnets[0].path"),
    ],
)
def test_bad_controlnets_are_422(
    fal_client: ModuleType,
    models: dict[str, str],
    stack_settings: Settings,
    change: dict,
    loc: list,
    says: str,
) -> None:
    unit = {"path": models["controlnet"], "image_url": _data_uri(_rings()), **change}
    if unit.get("mask_url") == "MASK_OF_ANOTHER_SIZE":
        unit["mask_url"] = _data_uri(np.zeros((32, 32), np.uint8))
    if unit["path"] == "MISSING_DIRECTORY":
        unit["path"] = str(Path(stack_settings.lora_models_dir).resolve() / "no-such-controlnet")
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=_args(models, controlnets=[unit]))
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"][: len(loc)] == loc and says in d["msg"] for d in detail), detail


@pytest.fixture(scope="module")
def xl_models(stack_settings: Settings) -> dict[str, str]:
    """A tiny SDXL base with SDXL's UNet layout and a tiny SDXL ControlNet, under the allowed model root."""
    from ember.specs.demo_controlnet_xl import build_tiny_sdxl_controllable, build_tiny_xl_controlnet

    root = stack_settings.lora_models_dir
    base, controlnet = root / "tiny-sdxl-controllable", root / "tiny-xl-controlnet"
    if not (base / "model_index.json").is_file():
        build_tiny_sdxl_controllable(base)
    if not (controlnet / "config.json").is_file():
        build_tiny_xl_controlnet(controlnet)
    return {"base": str(base.resolve()), "controlnet": str(controlnet.resolve())}


def test_sdxl_controlnet_directory_and_single_file(fal_client: ModuleType, client_env, xl_models) -> None:
    """An SDXL ControlNet on an SDXL base; the same weights as one .safetensors data URI with config_url
    (streamed to the checkpoint store by the gateway) give the same pixels."""
    directory = Path(xl_models["controlnet"])
    weights = (directory / "diffusion_pytorch_model.safetensors").read_bytes()
    unit = {"path": str(directory), "image_url": _data_uri(_rings()), "conditioning_scale": 1.2}
    single = {
        **unit,
        "path": "data:application/octet-stream;base64," + base64.b64encode(weights).decode(),
        "config_url": "data:application/json;base64,"
        + base64.b64encode((directory / "config.json").read_bytes()).decode(),
    }
    args = {**_args(xl_models), "guidance_scale": 5.0, "negative_prompt": "blurry"}
    results = [
        fal_client.run(ENDPOINT, arguments={**args, **extra})
        for extra in ({"controlnets": [unit]}, {"controlnets": [single]}, {})
    ]
    controlled, from_file, plain = (_pixels(r, client_env["SSL_CERT_FILE"]) for r in results)
    assert controlled.shape == (64, 96, 3)
    assert np.array_equal(controlled, from_file), "the single-file ControlNet differs from its directory"
    assert np.abs(controlled.astype(int) - plain.astype(int)).max() > 10, "the ControlNet changed nothing"
