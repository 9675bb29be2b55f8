"""fal-ai/lora SDXL base models on ONNX Runtime (models.toml [lora.sdv1-5] runtime = "onnxruntime"), tiny
random SDXL base: the four networks (both clip-skip encoders, the plain SDXL UNet, the VAE decoder) are
exported on first use with progress in the request's logs, a second load is warm from the export cache
(bit-identical images), and images stay within 1 uint8 level of the torch runtime and of diffusers'
StableDiffusionXLPipeline, with and without a LoRA on the UNet and both text encoders (refit by ONNX
Runtime initializer override); LoRA A -> B -> A and back to the base are bit-identical."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.loras import parse_lora
from ember.settings import Settings
from ember.specs.demo_sdxl import build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.tiny_lora import make_xl_lora

SIZE, STEPS = 64, 3
CFG = {"guidance_scale": 5.0, "negative_prompt": "blurry"}


def with_onnxruntime(settings: Settings) -> Settings:
    """The same settings with models.toml [lora.sdv1-5] runtime = "onnxruntime" (every fal-ai/lora base)."""
    models = {family: dict(variants) for family, variants in settings.models.items()}
    models["lora"] = {**models["lora"], "sdv1-5": {**models["lora"]["sdv1-5"], "runtime": "onnxruntime"}}
    return dataclasses.replace(settings, models=models)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("lora-xl-ort") / "tiny-sdxl-base")


@pytest.fixture(scope="module")
def settings(xl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(xl_dir.parent)
    )


@pytest.fixture(scope="module")
def torch_pipeline(settings: Settings) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(settings)


@pytest.fixture(scope="module")
def loras(xl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from safetensors.torch import load as load_safetensors

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        path = make_xl_lora(xl_dir, tmp_path_factory.mktemp(f"xl-lora-{name}"), seed)
        data = path.read_bytes()
        out[name] = (path, parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest()))
    return out


def _images(pipeline, xl_dir: Path, logs: list[str] | None = None, **kw) -> np.ndarray:
    request = LoraRequest(
        model=ModelRef(str(xl_dir)),
        prompt="a red fox",
        seed=7,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        **kw,
    )
    (result,) = pipeline([request], on_log=lambda i, m: (logs if logs is not None else []).append(m))
    assert result.error is None, result.error
    return result.images.numpy().astype(np.int16)


def _diffusers(xl_dir: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent))
        pipe.fuse_lora(lora_scale=scale)
    image = pipe(
        prompt="a red fox",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        **CFG,
    ).images
    return (image * 255).round().astype(np.int16)


def _levels(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def test_sdxl_exports_once_and_matches_torch_and_diffusers(settings, torch_pipeline, xl_dir):
    pipeline = LoraText2ImagePipeline(with_onnxruntime(settings))
    logs: list[str] = []
    ours = _images(pipeline, xl_dir, logs, **CFG)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        assert any(m.startswith(f"exporting {name} to ONNX") for m in logs), logs
        assert any(m.startswith(f"{name}.onnx verified") for m in logs), logs
    model = pipeline.model(ModelRef(str(xl_dir)))
    runners = (model.text_encoder, model.text_encoder_2, model.unet, model.vae_decoder)
    assert all(type(r).__name__ == "OnnxRuntimeRunner" for r in runners)
    vs_torch = _levels(ours, _images(torch_pipeline, xl_dir, **CFG))
    vs_diffusers = _levels(ours, _diffusers(xl_dir))
    print(f"sdxl onnxruntime: max {vs_torch} levels vs torch, {vs_diffusers} vs diffusers")
    assert vs_torch <= 1 and vs_diffusers <= 1
    # clip_skip reads another hidden state of both exported encoders
    skipped = _images(pipeline, xl_dir, clip_skip=2, **CFG)
    assert _levels(skipped, _images(torch_pipeline, xl_dir, clip_skip=2, **CFG)) <= 1
    assert _levels(skipped, ours) > 0

    # Warm: a new pipeline (a restarted server) loads the exports from the cache, exporting nothing.
    logs.clear()
    assert np.array_equal(
        _images(LoraText2ImagePipeline(with_onnxruntime(settings)), xl_dir, logs, **CFG), ours
    )
    assert any("found in the cache" in m for m in logs) and not any("exporting" in m for m in logs), logs


def test_sdxl_loras_refit_onnxruntime(settings, torch_pipeline, xl_dir, loras):
    """The UNet and both encoders take the LoRA (the first encoder's last layer, pruned from its export,
    is inert); A -> B -> A gives A's image and weights bit for bit, and the base comes back exactly."""
    pipeline = LoraText2ImagePipeline(with_onnxruntime(settings))
    (path_a, a), (_, b) = loras["a"], loras["b"]
    assert set(a.factors) == {"unet", "text_encoder", "text_encoder_2"}
    base = _images(pipeline, xl_dir, **CFG)
    model = pipeline.model(ModelRef(str(xl_dir)))
    # one adapted weight of each network (a q projection), as the runner holds it: base, then with A
    keys = {component: min(a.factors[component]) for component in ("unet", "text_encoder", "text_encoder_2")}
    weights = lambda: {c: getattr(model, c).weights()[k].clone() for c, k in keys.items()}
    base_weights = weights()
    with_a = _images(pipeline, xl_dir, loras=((a, 0.7),), **CFG)
    a_weights = weights()
    assert all(not torch.equal(a_weights[c], base_weights[c]) for c in keys), "a network was not refit"
    vs_torch = _levels(with_a, _images(torch_pipeline, xl_dir, loras=((a, 0.7),), **CFG))
    vs_diffusers = _levels(with_a, _diffusers(xl_dir, path_a, 0.7))
    print(f"sdxl onnxruntime LoRA: max {vs_torch} levels vs torch, {vs_diffusers} vs diffusers")
    assert vs_torch <= 1 and vs_diffusers <= 1
    assert np.abs(with_a - base).mean() > 3, "the LoRA hardly changed the image: the test proves nothing"

    assert _levels(_images(pipeline, xl_dir, loras=((b, 1.0),), **CFG), with_a) > 0
    assert np.array_equal(_images(pipeline, xl_dir, loras=((a, 0.7),), **CFG), with_a)
    assert all(torch.equal(weights()[c], a_weights[c]) for c in keys)
    assert np.array_equal(_images(pipeline, xl_dir, **CFG), base), "base weights not restored"
    assert all(torch.equal(weights()[c], base_weights[c]) for c in keys)
