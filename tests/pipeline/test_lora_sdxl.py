"""fal-ai/lora on an SDXL base model vs diffusers' StableDiffusionXLPipeline on the tiny SDXL base stand-in
(plain UNet, the base's EulerDiscreteScheduler; torch runtime): fal schedulers with a negative prompt and
CFG, the empty negative prompt (force_zeros_for_empty_prompt), no CFG, clip_skip on both encoders,
several images, LoRAs on the UNet and both encoders (load_lora_weights + fuse_lora) with the exact
restore, and the fields not served for SDXL refused by name."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.loras import parse_lora
from ember.pipeline.schedulers import fal_scheduler_config
from ember.specs.demo_sdxl import build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.tiny_lora import make_xl_lora

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("lora-xl") / "tiny-sdxl-base")


@pytest.fixture(scope="module")
def pipeline(xl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(xl_dir.parent)
    )
    return LoraText2ImagePipeline(settings)


@pytest.fixture(scope="module")
def reference(xl_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request(xl_dir: Path, **kw) -> LoraRequest:
    return LoraRequest(
        model=ModelRef(str(xl_dir)),
        prompt=kw.pop("prompt", "a red fox"),
        seed=kw.pop("seed", 7),
        width=SIZE,
        height=SIZE,
        num_inference_steps=kw.pop("num_inference_steps", STEPS),
        **kw,
    )


def _ours(pipeline, xl_dir, **kw) -> np.ndarray:
    (result,) = pipeline([_request(xl_dir, **kw)])
    assert result.error is None, result.error
    return result.images.numpy().astype(np.int16)


def _theirs(pipe, **kw) -> np.ndarray:
    image = pipe(
        prompt=kw.pop("prompt", "a red fox"),
        height=SIZE,
        width=SIZE,
        num_inference_steps=kw.pop("num_inference_steps", STEPS),
        generator=torch.Generator("cpu").manual_seed(kw.pop("seed", 7)),
        output_type="np",
        **kw,
    ).images
    return (image * 255).round().astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> int:
    """Same weights, same maths: at most 1 uint8 level (float summation order); returns the max."""
    assert a.shape == b.shape
    worst = int(np.abs(a - b).max())
    assert worst <= 1, f"max pixel difference {worst}"
    return worst


@pytest.mark.parametrize("name", [None, "DPM++ 2M Karras", "DDIM"])
def test_scheduler_parity(pipeline, reference, xl_dir, name):
    import diffusers

    base = dict(reference.scheduler.config)
    config = fal_scheduler_config({**base, "_class_name": type(reference.scheduler).__name__}, name)
    original = reference.scheduler
    reference.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    try:
        eta = 0.3 if name == "DDIM" else 0.0
        ours = _ours(pipeline, xl_dir, scheduler=name, guidance_scale=5.0, negative_prompt="blurry", eta=eta)
        theirs = _theirs(reference, guidance_scale=5.0, negative_prompt="blurry", eta=eta)
    finally:
        reference.scheduler = original
    print(f"sdxl base {name or 'default'} scheduler: max {_close(ours, theirs)} levels")


def test_empty_negative_prompt_no_cfg_and_images(pipeline, reference, xl_dir):
    """fal's "" negative prompt = diffusers' None: zeros (force_zeros_for_empty_prompt); guidance 1: no
    CFG; num_images 2 from one generator."""
    ours = _ours(pipeline, xl_dir, guidance_scale=5.0, num_images=2)
    theirs = _theirs(reference, guidance_scale=5.0, num_images_per_prompt=2)
    _close(ours, theirs)
    assert np.abs(ours[0] - ours[1]).max() > 0
    encoded_empty = _theirs(reference, guidance_scale=5.0, negative_prompt="", num_images_per_prompt=2)
    assert np.abs(encoded_empty - theirs).max() > 0, "zeros and an encoded empty prompt must differ"
    _close(_ours(pipeline, xl_dir, guidance_scale=1.0), _theirs(reference, guidance_scale=1.0))


def test_clip_skip_on_both_encoders(pipeline, reference, xl_dir):
    for clip_skip in (1, 2):
        ours = _ours(pipeline, xl_dir, clip_skip=clip_skip, guidance_scale=5.0, negative_prompt="blurry")
        _close(ours, _theirs(reference, clip_skip=clip_skip, guidance_scale=5.0, negative_prompt="blurry"))
    assert np.abs(_ours(pipeline, xl_dir, clip_skip=1) - _ours(pipeline, xl_dir)).max() > 0


def test_lora_parity_and_exact_restore(pipeline, reference, xl_dir, tmp_path):
    from safetensors.torch import load as load_safetensors

    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        path = make_xl_lora(xl_dir, tmp_path / name, seed)
        data = path.read_bytes()
        files[name] = (path, parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest()))
    assert set(files["a"][1].factors) == {"unet", "text_encoder", "text_encoder_2"}
    kw = {"guidance_scale": 5.0, "negative_prompt": "blurry"}
    base = _ours(pipeline, xl_dir, **kw)
    a = _ours(pipeline, xl_dir, loras=((files["a"][1], 0.7),), **kw)
    reference.load_lora_weights(str(files["a"][0].parent), adapter_name="a")
    reference.fuse_lora(lora_scale=0.7)
    try:
        theirs = _theirs(reference, **kw)
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
    print(f"sdxl base LoRA: max {_close(a, theirs)} levels; the LoRA moves {np.abs(a - base).mean():.1f}")
    assert np.abs(a - base).mean() > 3, "the LoRA hardly changed the image: the test proves nothing"
    model = pipeline.model(ModelRef(str(xl_dir)))
    te2_a = {k: v.clone() for k, v in model.text_encoder_2.weights().items()}
    _ours(pipeline, xl_dir, loras=((files["b"][1], 1.0),), **kw)
    assert np.array_equal(_ours(pipeline, xl_dir, loras=((files["a"][1], 0.7),), **kw), a)
    assert all(torch.equal(te2_a[k], v) for k, v in model.text_encoder_2.weights().items())
    assert np.array_equal(_ours(pipeline, xl_dir, **kw), base)


def test_unserved_fields_are_refused_by_name(pipeline, xl_dir):
    """What is not wired for SDXL bases fails that request alone, naming the fal field (a 422)."""
    for field, changes in (
    ):
        (result,) = pipeline([dataclasses.replace(_request(xl_dir), **changes)])
        assert result.images is None and result.error is not None, field
        assert field in result.error and "SDXL" in result.error, result.error
