"""fal-ai/lora base models (ember.pipeline.base_models) on tiny SD1.5 weights: a single-file checkpoint
(the diffusers directory written in the original LDM layout, tests/single_file_checkpoint.py) serves the
same images as the directory; `variant` and `unet_name` are honoured (vs diffusers' own pipeline loading
them); SD 2.x single-file checkpoints are refused naming model_name (SDXL ones are served:
test_lora_sdxl_single_file.py); the onnxruntime path exports once, is warm after,
stays within 1 uint8 level of torch, and follows the LRU bound."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ember.pipeline.base_models import CONFIGS_SUBDIR, checkpoint_shapes, match_config
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.specs.checkpoint_keys import checkpoint_family
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings
from tests.single_file_checkpoint import to_single_file

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EMBER_LORA_MODEL_ROOT: the tiny model, its single-file checkpoint, and its config directory (the
    directory without weights) under single-file-configs/ so conversion finds the tiny architecture."""
    root = tmp_path_factory.mktemp("lora-root")
    model = build_tiny_sd15(root / "tiny-sd15")
    shutil.copytree(
        model, root / CONFIGS_SUBDIR / "tiny-sd15", ignore=shutil.ignore_patterns("*.safetensors")
    )
    to_single_file(model, root / "checkpoints" / "tiny-sd15.safetensors")
    return root


@pytest.fixture(scope="module")
def settings(root: Path, tmp_path_factory: pytest.TempPathFactory):
    return tiny_settings(tmp_path_factory.mktemp("var"), EMBER_LORA_MODEL_ROOT=str(root))


def _images(pipeline, ref: ModelRef, logs: list[str] | None = None, **kw) -> np.ndarray:
    request = LoraRequest(
        model=ref, prompt="a red fox", seed=7, width=SIZE, height=SIZE, num_inference_steps=STEPS, **kw
    )
    (result,) = pipeline([request], on_log=lambda i, m: (logs if logs is not None else []).append(m))
    assert result.error is None, result.error
    return result.images.numpy().astype(np.int16)


def _diffusers(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red fox",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images
    return (image * 255).round().astype(np.int16)


def test_single_file_checkpoint_serves_the_same_images(settings, root):
    pipeline = LoraText2ImagePipeline(settings)
    checkpoint = root / "checkpoints" / "tiny-sd15.safetensors"
    shapes = checkpoint_shapes(checkpoint)
    assert checkpoint_family(shapes) == "sd15"
    assert match_config(settings, shapes).name == "tiny-sd15"
    logs: list[str] = []
    from_file = _images(pipeline, ModelRef(str(checkpoint)), logs)
    assert any(m.startswith("converting single-file checkpoint") for m in logs), logs
    from_dir = _images(pipeline, ModelRef(str(root / "tiny-sd15")))
    # The same weights through the same code: bit-identical images.
    assert np.array_equal(from_file, from_dir)
    # Converted once: a new pipeline (a restarted server) loads the cached directory without converting.
    logs.clear()
    _images(LoraText2ImagePipeline(settings), ModelRef(str(checkpoint)), logs)
    assert not any(m.startswith("converting") for m in logs), logs


def test_fp16_single_file_checkpoint_loads(settings, root, tmp_path):
    """Most published checkpoints are fp16: converted and served in EMBER_DTYPE, close to the fp32 file."""
    pipeline = LoraText2ImagePipeline(settings)
    half = to_single_file(
        root / "tiny-sd15", root / "checkpoints" / "tiny-sd15-fp16.safetensors", torch.float16
    )
    try:
        ours = _images(pipeline, ModelRef(str(half)))
    finally:
        half.unlink()
    full = _images(pipeline, ModelRef(str(root / "tiny-sd15")))
    # measured: max 1 level (mean 0.03) on the tiny model
    assert np.abs(ours - full).max() <= 2, "fp16 rounding of the weights moved pixels too far"


def test_sd2_weights_are_refused_naming_model_name(settings, root, tmp_path):
    pipeline = LoraText2ImagePipeline(settings)
    # Single file: SD 2.x's layout (OpenCLIP text encoder under cond_stage_model.model.) told apart by names.
    sd2 = root / "checkpoints" / "sd2-like.safetensors"
    names = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.model.ln_final.weight",
    ]
    save_file({name: torch.zeros(2) for name in names}, str(sd2))
    assert checkpoint_family(names) == "sd2"
    # (SDXL directories and single files are served: test_lora_sdxl.py, test_lora_sdxl_single_file.py)
    (result,) = pipeline([LoraRequest(model=ModelRef(str(sd2)), prompt="x", seed=0, width=64, height=64)])
    assert result.images is None
    assert result.error.startswith("model_name:") and "2.x" in result.error, result.error
    with pytest.raises(ValueError, match="not a Stable Diffusion single-file checkpoint"):
        checkpoint_family(["lora_unet_down_blocks_0.alpha"])


def test_variant_and_unet_name_are_honoured(settings, root):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model = root / "tiny-sd15"
    # fp16 variant files with other weights beside the default ones (as HF repos ship "fp16" branches).
    other = build_tiny_sd15(root / "tiny-sd15-other", seed=1)
    for sub in ("unet", "vae", "text_encoder"):
        for file in (other / sub).glob("*.safetensors"):
            name = file.name.replace(".safetensors", ".fp16.safetensors")
            shutil.copy(file, model / sub / name)
    pipeline = LoraText2ImagePipeline(settings)
    try:
        ours = _images(pipeline, ModelRef(str(model), variant="fp16"))
        theirs = _diffusers(
            StableDiffusionPipeline.from_pretrained(
                model, variant="fp16", safety_checker=None, requires_safety_checker=False
            )
        )
        assert np.abs(ours - theirs).max() <= 1
        assert np.abs(ours - _images(pipeline, ModelRef(str(model)))).max() > 0, "variant ignored"
    finally:
        for file in model.glob("*/*.fp16.safetensors"):
            file.unlink()

    # unet_name: a UNet directory of its own (config.json at its root) replaces the base's.
    ours = _images(pipeline, ModelRef(str(model), unet=str(other / "unet")))
    reference = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False
    )
    reference.unet = UNet2DConditionModel.from_pretrained(other / "unet")
    assert np.abs(ours - _diffusers(reference)).max() <= 1


def test_onnxruntime_base_models_export_once_and_match_torch(settings, root):
    """models.toml [lora.sdv1-5] runtime = "onnxruntime": exported on first use (progress in that request's
    logs), warm after, within 1 level of the torch runtime; LRU of max_models."""
    models = {family: dict(variants) for family, variants in settings.models.items()}
    models["lora"] = {"sdv1-5": {**models["lora"]["sdv1-5"], "runtime": "onnxruntime"}}
    ort_settings = dataclasses.replace(settings, models=models)
    pipeline = LoraText2ImagePipeline(ort_settings, max_models=1)
    model, checkpoint = root / "tiny-sd15", root / "checkpoints" / "tiny-sd15.safetensors"
    logs: list[str] = []
    ours = _images(pipeline, ModelRef(str(model)), logs)
    assert any(m.startswith("exporting unet to ONNX") for m in logs), logs
    assert any(m.startswith("unet.onnx verified") for m in logs), logs
    assert type(pipeline.model(ModelRef(str(model))).unet).__name__ == "OnnxRuntimeRunner"
    torch_images = _images(LoraText2ImagePipeline(settings), ModelRef(str(model)))
    assert np.abs(ours - torch_images).max() <= 1, np.abs(ours - torch_images).max()

    # Warm: the same model again loads nothing; another model evicts it (max_models=1) ...
    logs.clear()
    assert np.array_equal(_images(pipeline, ModelRef(str(model)), logs), ours)
    assert logs == []
    _images(pipeline, ModelRef(str(checkpoint)), logs)
    assert any("unloading base model" in m for m in logs), logs
    # ... and coming back to it reloads from the export cache, without exporting again.
    logs.clear()
    assert np.array_equal(_images(pipeline, ModelRef(str(model)), logs), ours)
    assert any("found in the cache" in m for m in logs) and not any("exporting" in m for m in logs), logs

    # LoRAs on this runtime: fused by Runner.refit (overridable initializers), as on torch, within 1 level.
    import hashlib

    from safetensors.torch import load as load_safetensors

    from ember.pipeline.loras import parse_lora
    from tests.pipeline.test_lora_parity import _make_lora

    data = _make_lora(model, root / "lora-a", seed=1)
    lora = ((parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest()), 0.8),)
    with_lora = _images(pipeline, ModelRef(str(model)), loras=lora)
    torch_lora = _images(LoraText2ImagePipeline(settings), ModelRef(str(model)), loras=lora)
    assert np.abs(with_lora - torch_lora).max() <= 1, np.abs(with_lora - torch_lora).max()
    assert np.abs(with_lora - ours).max() > 0, "the LoRA changed nothing"
    assert np.array_equal(_images(pipeline, ModelRef(str(model))), ours), "base weights not restored"
