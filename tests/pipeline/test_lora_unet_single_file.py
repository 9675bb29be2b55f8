"""fal-ai/lora `unet_name` as a single-file UNet (ember.pipeline.base_models.convert_single_file_unet): a
UNet-only .safetensors in LDM key names (`model.diffusion_model.*` as cut from a full checkpoint, or
`diffusion_model.*` as ComfyUI saves UNets) or in diffusers' own names, converted with diffusers'
UNet2DConditionModel.from_single_file against the base model's UNet config, serves the same images as the
same UNet as a diffusers directory (bit-identical: the same weights through the same code) and as diffusers'
own pipeline with that UNet; converted once per file; a UNet of another architecture is refused naming
unet_name. Tiny random SD1.5 models."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings
from tests.single_file_checkpoint import UNET_PREFIX, to_single_file

SIZE, STEPS = 64, 3


def _stored(tensors: dict[str, torch.Tensor], root: Path) -> Path:
    """Saved where the gateway streams unet_name URLs: <root>/checkpoints/<sha256>.safetensors."""
    staging = root / "staging.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging))
    target = root / "checkpoints" / f"{hashlib.sha256(staging.read_bytes()).hexdigest()}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    return staging.replace(target)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-root")
    build_tiny_sd15(root / "tiny-sd15")
    build_tiny_sd15(root / "tiny-sd15-other", seed=1)  # its UNet is the custom one
    return root


def _images(pipeline, ref: ModelRef, logs: list[str] | None = None) -> tuple[np.ndarray | None, str | None]:
    request = LoraRequest(
        model=ref, prompt="a red fox", seed=7, width=SIZE, height=SIZE, num_inference_steps=STEPS
    )
    (result,) = pipeline([request], on_log=lambda i, m: (logs if logs is not None else []).append(m))
    if result.error is not None:
        return None, result.error
    return result.images.numpy().astype(np.int16), None


def test_single_file_unets_serve_the_same_images(root: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    settings = tiny_settings(tmp_path / "var", EMBER_LORA_MODEL_ROOT=str(root))
    base, other = root / "tiny-sd15", root / "tiny-sd15-other"
    full = load_file(str(to_single_file(other, tmp_path / "other-full.safetensors")))
    ldm = {k: v for k, v in full.items() if k.startswith(UNET_PREFIX)}  # the UNet cut from a checkpoint
    files = {
        "model.diffusion_model.*": _stored(ldm, root),
        "diffusion_model.*": _stored({k.removeprefix("model."): v for k, v in ldm.items()}, root),
        "diffusers": _stored(load_file(str(next((other / "unet").glob("*.safetensors")))), root),
    }
    pipeline = LoraText2ImagePipeline(settings)
    from_dir, error = _images(pipeline, ModelRef(str(base), unet=str(other / "unet")))
    assert error is None, error
    for layout, file in files.items():
        logs: list[str] = []
        images, error = _images(pipeline, ModelRef(str(base), unet=str(file)), logs)
        assert error is None, (layout, error)
        assert any(m.startswith("converting single-file UNet") for m in logs), (layout, logs)
        assert np.array_equal(images, from_dir), layout  # the same weights through the same code

    # vs diffusers' own pipeline with the UNet loaded by from_single_file (LDM names).
    reference = StableDiffusionPipeline.from_pretrained(
        base, safety_checker=None, requires_safety_checker=False
    )
    reference.unet = UNet2DConditionModel.from_single_file(
        {k: v for k, v in full.items() if k.startswith(UNET_PREFIX)}, config=str(base / "unet")
    )
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        "a red fox",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images
    diff = np.abs(from_dir - (theirs * 255).round().astype(np.int16)).max()
    assert diff <= 1, diff  # measured: 0 or 1 level (uint8 rounding)
    assert np.abs(from_dir - _images(pipeline, ModelRef(str(base)))[0]).max() > 0, "unet_name ignored"

    # Converted once: a new pipeline (a restarted server) finds the cached directory.
    logs = []
    again, _ = _images(
        LoraText2ImagePipeline(settings), ModelRef(str(base), unet=str(files["diffusers"])), logs
    )
    assert np.array_equal(again, from_dir) and not any(m.startswith("converting") for m in logs), logs

    # A UNet of another architecture (a conv_in of other width) is refused naming unet_name.
    wrong = dict(ldm)
    wrong[f"{UNET_PREFIX}input_blocks.0.0.weight"] = torch.zeros(7, 4, 3, 3)
    images, error = _images(pipeline, ModelRef(str(base), unet=str(_stored(wrong, root))))
    assert images is None and error.startswith("unet_name:"), error
    shutil.rmtree(settings.export_dir / "lora-single-file-unet", ignore_errors=True)
