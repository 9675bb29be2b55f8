"""fal-ai/lora `unet_name` on SDXL base models (ember.pipeline.base_models.prepare, as for SD1.5): a UNet
directory of its own replaces the base's, matching diffusers' StableDiffusionXLPipeline given that UNet
(`unet=`) within 1 uint8 level, on torch and on ONNX Runtime (its own export: the custom UNet is part of the
export key); the same UNet as a single file (LDM names cut from an SGM checkpoint, or diffusers' names) gives
the same images bit for bit; an SD1.5 UNet (directory or file) on an SDXL base is refused naming unet_name.
Tiny random models."""

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
from ember.specs.demo_sdxl import build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_lora_sdxl_ort import with_onnxruntime
from tests.single_file_checkpoint import UNET_PREFIX, to_single_file_xl

SIZE, STEPS = 64, 3
CFG = {"guidance_scale": 5.0, "negative_prompt": "blurry"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EMBER_LORA_MODEL_ROOT: the tiny SDXL base, an SDXL UNet of the same architecture with other
    weights (its own directory, config.json at the root), and a tiny SD1.5 model."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("lora-xl-unet")
    base = build_tiny_sdxl(root / "tiny-sdxl-base")
    torch.manual_seed(1)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet")).save_pretrained(
        root / "other-unet"
    )
    build_tiny_sd15(root / "tiny-sd15")
    return root


def _stored(tensors: dict[str, torch.Tensor], root: Path) -> Path:
    """Saved where the gateway streams unet_name URLs: <root>/checkpoints/<sha256>.safetensors."""
    staging = root / "staging.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging))
    target = root / "checkpoints" / f"{hashlib.sha256(staging.read_bytes()).hexdigest()}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    return staging.replace(target)


def _run(pipeline, ref: ModelRef, logs: list[str] | None = None) -> tuple[np.ndarray | None, str | None]:
    request = LoraRequest(
        model=ref, prompt="a red fox", seed=7, width=SIZE, height=SIZE, num_inference_steps=STEPS, **CFG
    )
    (result,) = pipeline([request], on_log=lambda i, m: (logs if logs is not None else []).append(m))
    if result.error is not None:
        return None, result.error
    return result.images.numpy().astype(np.int16), None


def _images(pipeline, ref: ModelRef, logs: list[str] | None = None) -> np.ndarray:
    images, error = _run(pipeline, ref, logs)
    assert error is None, error
    return images


def test_sdxl_unet_name_directory_and_single_files(root: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    settings = tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(root))
    base, unet_dir = root / "tiny-sdxl-base", root / "other-unet"
    pipeline = LoraText2ImagePipeline(settings)
    ours = _images(pipeline, ModelRef(str(base), unet=str(unet_dir)))

    reference = StableDiffusionXLPipeline.from_pretrained(
        base, unet=UNet2DConditionModel.from_pretrained(unet_dir), add_watermarker=False
    )
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        prompt="a red fox",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        **CFG,
    ).images
    vs_diffusers = int(np.abs(ours - (theirs * 255).round().astype(np.int16)).max())
    print(f"sdxl unet_name: max {vs_diffusers} levels vs diffusers")
    assert vs_diffusers <= 1
    assert np.abs(ours - _images(pipeline, ModelRef(str(base)))).max() > 0, "unet_name ignored"

    # The same UNet as single files: LDM names (cut from an SGM checkpoint of base + that UNet) and
    # diffusers' own names, each converted once against the base's UNet config: the same weights.
    with_unet = shutil.copytree(base, tmp_path / "with-unet", ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(unet_dir, with_unet / "unet")
    full = load_file(str(to_single_file_xl(with_unet, tmp_path / "sgm.safetensors")))
    files = {
        "model.diffusion_model.*": _stored(
            {k: v for k, v in full.items() if k.startswith(UNET_PREFIX)}, root
        ),
        "diffusers": _stored(load_file(str(next(unet_dir.glob("*.safetensors")))), root),
    }
    for layout, file in files.items():
        logs: list[str] = []
        assert np.array_equal(_images(pipeline, ModelRef(str(base), unet=str(file)), logs), ours), layout
        assert any(m.startswith("converting single-file UNet") for m in logs), (layout, logs)

    # An SD1.5 UNet on an SDXL base: refused naming unet_name, as a directory and as a file.
    sd15_unet = root / "tiny-sd15" / "unet"
    for unet in (sd15_unet, _stored(load_file(str(next(sd15_unet.glob("*.safetensors")))), root)):
        images, error = _run(pipeline, ModelRef(str(base), unet=str(unet)))
        assert images is None and error.startswith("unet_name:") and "SD1.5" in error, error
    # An SDXL UNet of another kind (inpainting: 9 input channels) does not fit the base's latents.
    config = UNet2DConditionModel.load_config(unet_dir)
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(tmp_path / "inpaint-unet")
    images, error = _run(pipeline, ModelRef(str(base), unet=str(tmp_path / "inpaint-unet")))
    assert images is None and error.startswith("unet_name:") and "in_channels" in error, error


def test_sdxl_unet_name_on_onnxruntime(root: Path, tmp_path: Path) -> None:
    """The custom UNet is exported in its own artifact directory (the key names it) and matches torch."""
    settings = tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(root))
    ref = ModelRef(str(root / "tiny-sdxl-base"), unet=str(root / "other-unet"))
    logs: list[str] = []
    ours = _images(LoraText2ImagePipeline(with_onnxruntime(settings)), ref, logs)
    assert any(m.startswith("exporting unet to ONNX") for m in logs), logs
    torch_pipeline = LoraText2ImagePipeline(settings)
    vs_torch = int(np.abs(ours - _images(torch_pipeline, ref)).max())
    print(f"sdxl unet_name onnxruntime: max {vs_torch} levels vs torch")
    assert vs_torch <= 1
    assert np.abs(ours - _images(torch_pipeline, ModelRef(ref.source))).max() > 1, "the base UNet ran"
