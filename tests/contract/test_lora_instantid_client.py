"""fal-client, unmodified, against the real gateway + tritonserver: InstantID on fal-ai/lora — an SDXL base
directory, an InstantID-style adapter (IP-Adapter Plus's Resampler over the 512-d face embedding) with
insight_face_model_path naming a tiny InsightFace-signature pack, and an SDXL ControlNet as IdentityNet with
`ip_adapter_index: 0`. The served image equals the in-process pipeline's (within 1 uint8 level, other
thread counts), which tests/pipeline/test_lora_instantid.py checks against diffusers' modules; it differs
from the same ControlNet reading the prompt; an index past the ip_adapter list is a 422 naming it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ember.settings import Settings
from tests.pipeline.test_lora_controlnets import rings
from tests.pipeline.test_lora_ip_adapter_faceid import _face

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"
WEIGHT_NAME = "ip-adapter.safetensors"  # InstantX/InstantID's ip-adapter.bin, as safetensors
ARGS = {
    "prompt": "a portrait",
    "negative_prompt": "blurry",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "image_format": "png",
    "seed": 7,
}


@pytest.fixture(scope="module")
def models(stack_settings: Settings) -> dict[str, Path]:
    from safetensors.torch import save_file

    from ember.specs.demo_controlnet_xl import build_tiny_sdxl_controllable, build_tiny_xl_controlnet
    from ember.specs.demo_face_id import build_tiny_insightface
    from ember.specs.demo_ip_adapter import ip_adapter_plus_state_dict

    root = stack_settings.lora_models_dir
    base = root / "tiny-sdxl-instantid"
    if not (base / "model_index.json").is_file():
        build_tiny_sdxl_controllable(base)
    adapter = root / "tiny-instantid"
    if not (adapter / WEIGHT_NAME).is_file():
        unet_config = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))
        adapter.mkdir(parents=True, exist_ok=True)
        state = ip_adapter_plus_state_dict(unet_config, 512, torch.Generator().manual_seed(5))
        save_file(state, adapter / WEIGHT_NAME)
    identitynet = root / "tiny-identitynet"
    if not (identitynet / "config.json").is_file():
        build_tiny_xl_controlnet(identitynet, seed=3)
    pack = root / "tiny-antelope"
    if not (pack / "w600k_r50.onnx").is_file():
        build_tiny_insightface(pack)
    return {
        "base": base.resolve(),
        "adapter": adapter.resolve(),
        "identitynet": identitynet.resolve(),
        "pack": pack.resolve(),
    }


def _data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)


def _arguments(models: dict[str, Path], index: int | None) -> dict:
    control = {"path": str(models["identitynet"]), "image_url": _data_uri(rings()), "conditioning_scale": 0.9}
    adapter = {
        "ip_adapter_image_url": _data_uri(_face(3)),
        "path": str(models["adapter"]),
        "weight_name": WEIGHT_NAME,
        "insight_face_model_path": str(models["pack"]),
        "scale": 0.8,
    }
    if index is not None:
        control["ip_adapter_index"] = index
    return {**ARGS, "model_name": str(models["base"]), "controlnets": [control], "ip_adapter": [adapter]}


def _in_process(models: dict[str, Path], tmp_path: Path) -> np.ndarray:
    import hashlib

    from safetensors.torch import load_file

    from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterUnit, parse_ip_adapter
    from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
    from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef
    from tests.pipeline.conftest import tiny_settings

    file = models["adapter"] / WEIGHT_NAME
    weights = parse_ip_adapter(load_file(file), hashlib.sha256(file.read_bytes()).hexdigest())
    unit = IPAdapterUnit(weights, (_face(3),), scale=0.8, face_pack=str(models["pack"]))
    request = LoraRequest(
        model=ModelRef(str(models["base"])),
        prompt=ARGS["prompt"],
        negative_prompt=ARGS["negative_prompt"],
        seed=ARGS["seed"],
        guidance_scale=ARGS["guidance_scale"],
        num_inference_steps=ARGS["num_inference_steps"],
        width=64,
        height=64,
        controlnets=(
            ControlNetInput(
                ControlNetRef(str(models["identitynet"])), rings(), conditioning_scale=0.9, ip_adapter_index=0
            ),
        ),
        ip_adapter=IPAdapterRequest((unit,), ""),
    )
    settings = tiny_settings(
        tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(models["base"].parent)
    )
    (result,) = LoraText2ImagePipeline(settings)([request])
    assert result.error is None, result.error
    return result.images[0].numpy().astype(np.int16)


def test_instantid_served_matches_the_pipeline(
    fal_client: ModuleType, client_env, models: dict[str, Path], tmp_path: Path
) -> None:
    cafile = client_env["SSL_CERT_FILE"]
    on_face = _pixels(fal_client.run(ENDPOINT, arguments=_arguments(models, 0)), cafile)
    on_prompt = _pixels(fal_client.run(ENDPOINT, arguments=_arguments(models, None)), cafile)
    diff = int(np.abs(on_face - _in_process(models, tmp_path)).max())
    print(f"InstantID served vs in-process: max {diff} uint8 levels")
    assert diff <= 1
    assert np.abs(on_face - on_prompt).max() > 4, "the face tokens must condition the ControlNet"
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=_arguments(models, 1))
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"][-1] == "ip_adapter_index" for d in detail), detail
