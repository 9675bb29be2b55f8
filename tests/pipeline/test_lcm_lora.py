"""fal-ai/lcm lora_url + lora_scale: our LCM pipeline with a LoRA fused vs diffusers'
LatentConsistencyModelPipeline + load_lora_weights + fuse_lora(lora_scale=...), on the tiny LCM model with a
tiny random LoRA (UNet attention + text encoder); exact switching between sets on ONNX Runtime."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline import Text2ImageRequest
from ember.pipeline.loras import LoraFile, parse_lora
from tests.pipeline.tiny_lora import make_lora

SCALE = 0.7
BASE = Text2ImageRequest(prompt="a photo of a cat", seed=42, width=128, height=128, guidance_scale=8.5)


@pytest.fixture(scope="module")
def lora_files(lcm_artifacts, tmp_path_factory) -> dict[str, tuple[Path, LoraFile]]:
    from safetensors.torch import load

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        path = make_lora(lcm_artifacts.source, tmp_path_factory.mktemp(f"lcm-lora-{name}"), seed)
        data = path.read_bytes()
        out[name] = (path, parse_lora(load(data), hashlib.sha256(data).hexdigest()))
    return out


def _ours(pipeline, request: Text2ImageRequest) -> np.ndarray:
    [result] = pipeline([request])
    return result.images.numpy().astype(np.int16)


def test_lora_matches_diffusers_fuse_lora(ort_pipeline, torch_pipeline, diffusers_lcm, lora_files) -> None:
    """torch: the same weights merged in float32 as diffusers' fuse_lora, only the order of the float
    operations of the merge differs (W + s*(B@A) vs peft's W + (B@A)*s): measured identical uint8 images.
    ONNX Runtime: the export tolerance on top (see test_lcm_parity): at most 2 levels, measured 1."""
    path, lora = lora_files["a"]
    request = dataclasses.replace(BASE, loras=((lora, SCALE),))
    diffusers_lcm.load_lora_weights(str(path.parent), adapter_name="a")
    diffusers_lcm.fuse_lora(lora_scale=SCALE)
    try:
        out = diffusers_lcm(
            BASE.prompt,
            width=BASE.width,
            height=BASE.height,
            num_inference_steps=BASE.num_inference_steps,
            guidance_scale=BASE.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(BASE.seed),
            output_type="pil",
        )
        theirs = np.stack([np.asarray(image) for image in out.images]).astype(np.int16)
    finally:
        diffusers_lcm.unfuse_lora()
        diffusers_lcm.unload_lora_weights()
    torch_diff = np.abs(_ours(torch_pipeline, request) - theirs)
    ort_diff = np.abs(_ours(ort_pipeline, request) - theirs)
    base = _ours(ort_pipeline, BASE)
    print(f"lcm LoRA parity: torch max {torch_diff.max()}, onnxruntime max {ort_diff.max()} levels")
    assert np.abs(base - theirs).mean() > 5, "the LoRA hardly changed the image: the test proves nothing"
    assert torch_diff.max() <= 1
    assert ort_diff.max() <= 2 and (ort_diff > 0).mean() < 0.01


def test_switching_sets_is_exact_on_onnxruntime(ort_pipeline, lora_files) -> None:
    """base -> A -> B -> A -> base: the pristine weights come back bit for bit, so A and the base give the
    images they gave before, exactly (LoraState restores from pristine copies; ORT feeds the same arrays)."""
    a = dataclasses.replace(BASE, loras=((lora_files["a"][1], SCALE),))
    b = dataclasses.replace(BASE, loras=((lora_files["b"][1], 1.0),))
    base = _ours(ort_pipeline, BASE)
    first_a = _ours(ort_pipeline, a)
    first_b = _ours(ort_pipeline, b)
    assert np.abs(first_a - base).max() > 0 and np.abs(first_b - first_a).max() > 0
    assert np.array_equal(_ours(ort_pipeline, a), first_a)
    assert np.array_equal(_ours(ort_pipeline, BASE), base)
    # The same file at another scale is another set.
    assert (
        np.abs(
            _ours(ort_pipeline, dataclasses.replace(a, loras=((lora_files["a"][1], 0.3),))) - first_a
        ).max()
        > 0
    )


def test_batches_group_by_lora_set(ort_pipeline, lora_files) -> None:
    """One execute with and without LoRA: each request gets the image it gets alone (the pipeline runs one
    network batch per LoRA set, restoring the base for the others)."""
    a = dataclasses.replace(BASE, loras=((lora_files["a"][1], SCALE),))
    requests = [BASE, a, dataclasses.replace(a, seed=7), dataclasses.replace(BASE, seed=7)]
    batched = ort_pipeline(requests)
    for request, result in zip(requests, batched, strict=True):
        alone = _ours(ort_pipeline, request)
        assert np.abs(result.images.numpy().astype(np.int16) - alone).max() <= 1


def test_loras_for_another_model_are_refused_by_name(ort_pipeline) -> None:
    alien = parse_lora(
        {
            "unet.mid_block.nope.lora_A.weight": torch.ones(2, 4),
            "unet.mid_block.nope.lora_B.weight": torch.ones(4, 2),
        },
        "alien",
    )
    problems = ort_pipeline.problems(dataclasses.replace(BASE, loras=((alien, 1.0),)))
    assert any("mid_block.nope" in p for p in problems)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    too_wide = parse_lora(
        {f"unet.{q}.lora_A.weight": torch.ones(2, 999), f"unet.{q}.lora_B.weight": torch.ones(4, 2)}, "wide"
    )
    assert any(
        "another model size" in p
        for p in ort_pipeline.problems(dataclasses.replace(BASE, loras=((too_wide, 1.0),)))
    )
    assert ort_pipeline.problems(dataclasses.replace(BASE, loras=((too_wide, float("nan")),)))
