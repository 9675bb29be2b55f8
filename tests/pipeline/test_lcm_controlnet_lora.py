"""fal-ai/lcm controlnet_inpaint together with lora_url: the LoRA's UNet part fused into the ControlNet-steered
UNet (the `controlled_unet` export of the same UNet, LcmLoras.apply_controlled) as well as into the plain UNet
and text encoder, vs diffusers' StableDiffusionControlNetInpaintPipeline + load_lora_weights +
fuse_lora(lora_scale=...) on the tiny LCM model, inpaint ControlNet and a tiny random LoRA; the base weights
of both UNets come back exactly for requests without LoRA."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from ember.pipeline.loras import parse_lora
from tests.pipeline.test_lcm_controlnet_inpaint import (  # noqa: F401 (fixtures)
    _diff,
    cn_ort,
    cn_torch,
    controlnet_source,
    reference,
    request,
    run_reference,
)
from tests.pipeline.tiny_lora import make_lora

SCALE = 0.7


@pytest.fixture(scope="module")
def lora(lcm_artifacts, tmp_path_factory):
    from safetensors.torch import load

    path = make_lora(lcm_artifacts.source, tmp_path_factory.mktemp("lcm-cn-lora"), seed=1)
    data = path.read_bytes()
    return path, parse_lora(load(data), hashlib.sha256(data).hexdigest())


def test_lora_with_controlnet_inpaint_matches_diffusers(cn_torch, cn_ort, reference, lora) -> None:  # noqa: F811
    """torch: measured 0 levels off; ONNX Runtime: the export tolerance on top (test_lcm_parity), at most 2
    levels on < 1 % of the values, measured 1."""
    path, parsed = lora
    plain = request(num_images=2)
    with_lora = dataclasses.replace(plain, loras=((parsed, SCALE),))
    assert cn_ort.problems(with_lora) == []  # no longer refused
    reference.load_lora_weights(str(path.parent), adapter_name="a")
    reference.fuse_lora(lora_scale=SCALE)
    try:
        theirs = run_reference(reference, cn_ort, with_lora)
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
    [torch_result] = cn_torch([with_lora])
    [ort_result] = cn_ort([with_lora])
    torch_diff, ort_diff = _diff(torch_result.images, theirs), _diff(ort_result.images, theirs)
    [base] = cn_ort([plain])
    print(
        f"lcm controlnet_inpaint + LoRA parity: torch max {torch_diff.max()}, onnxruntime max {ort_diff.max()}"
    )
    assert _diff(base.images, theirs).mean() > 2, "the LoRA hardly changed the image: the test proves nothing"
    assert torch_diff.max() <= 1
    assert ort_diff.max() <= 2 and (ort_diff > 0).mean() < 0.01, (ort_diff.max(), (ort_diff > 0).mean())


def test_the_lora_reaches_the_controlled_unet(cn_ort, lora) -> None:  # noqa: F811
    """Only the UNet part of the LoRA: fused into the plain UNet alone it would leave the ControlNet-steered
    UNet's output unchanged; here it changes it."""
    _, parsed = lora
    unet_only = dataclasses.replace(parsed, factors={"unet": parsed.factors["unet"]})
    plain = request(strength=1.0, seed=3)
    [base, fused] = cn_ort([plain, dataclasses.replace(plain, loras=((unet_only, SCALE),))])
    assert _diff(fused.images, base.images.numpy()).max() > 8


def test_both_unets_get_their_base_back_exactly(cn_ort, lora) -> None:  # noqa: F811
    """controlnet_inpaint and plain requests, with and without the LoRA, interleaved: every request without
    LoRA gives, bit for bit, the image it gave before any LoRA was fused (ONNX Runtime refit)."""
    _, parsed = lora
    steered = request(seed=11, strength=1.0)
    plain = request(seed=11, strength=1.0, controlnet_inpaint=False)
    before = [cn_ort([r])[0].images for r in (steered, plain)]
    cn_ort([dataclasses.replace(steered, loras=((parsed, SCALE),))])
    assert np.array_equal(cn_ort([plain])[0].images, before[1])
    cn_ort([dataclasses.replace(plain, loras=((parsed, 1.0),))])
    assert np.array_equal(cn_ort([steered])[0].images, before[0])
    # one execute holding all four: each group gets its own set, the steered base still exact
    mixed = cn_ort([steered, dataclasses.replace(steered, loras=((parsed, SCALE),)), plain])
    assert np.array_equal(mixed[0].images, before[0]) and np.array_equal(mixed[2].images, before[1])
