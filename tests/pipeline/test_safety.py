"""The shared safety checker stage: the real StableDiffusionSafetyChecker architecture (tiny, random, with
one calibrated concept: see ember.specs.safety), exported to ONNX, with diffusers' decision rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline import Text2ImageRequest
from ember.specs.safety import safety_trigger_image

# Images the demo checker must pass: flat, noisy, gradient (cosine to the trigger 0.56 ... 0.99).
_rng = np.random.default_rng(0)
_yy, _xx = np.mgrid[0:256, 0:256]
BENIGN = {
    "grey": np.full((256, 256, 3), 128, np.uint8),
    "noise": _rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
    "gradient": np.stack([_xx, _yy, (_xx + _yy) // 2], -1).astype(np.uint8),
}


@pytest.fixture(scope="module")
def diffusers_checker(safety_checker, var_dir):
    """diffusers' own StableDiffusionSafetyChecker.forward on the same weights, in torch."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from ember.settings import load_settings

    source = load_settings(
        {"EMBER_VAR_DIR": str(var_dir), "EMBER_WEIGHTS": "demo"}, dotenv=Path("/nonexistent")
    ).model_source("safety_checker", "sd")
    return StableDiffusionSafetyChecker.from_pretrained(source).eval()


def test_trigger_fires_and_goes_black_others_pass_untouched(safety_checker) -> None:
    images = torch.from_numpy(np.stack([safety_trigger_image(), *BENIGN.values()]))
    checked, flags = safety_checker(images)
    assert flags == [True, False, False, False]
    assert checked[0].max() == 0  # black
    assert torch.equal(checked[1:], images[1:])  # untouched
    assert images[0].max() == 255  # the caller's tensor is not modified


def test_flags_match_diffusers_safety_checker(safety_checker, diffusers_checker) -> None:
    """Same flags as diffusers' forward (its per-image Python rule, rounding included) on the same
    CLIP-processed inputs, and the exported scores within 1e-4 of torch's cosine - threshold."""
    images = np.stack([safety_trigger_image(), *BENIGN.values()])
    clip_input = safety_checker.feature_extractor(
        [Image.fromarray(i) for i in images], return_tensors="pt"
    ).pixel_values
    _, want = diffusers_checker(images=np.zeros((len(images), 8, 8, 3)), clip_input=clip_input)
    assert want == [True, False, False, False]
    assert safety_checker.flags(torch.from_numpy(images)) == want
    ours = safety_checker.scores.run({"clip_input": clip_input})["concept_scores"]
    with torch.no_grad():
        embeds = diffusers_checker.visual_projection(diffusers_checker.vision_model(clip_input)[1])
        cosine = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(
            diffusers_checker.concept_embeds
        ).t()
    assert (ours - (cosine - diffusers_checker.concept_embeds_weights)).abs().max() < 1e-4


def test_pipeline_blacks_out_a_flagged_result(checked_pipeline) -> None:
    """End to end: inpainting a trigger image with inpaint_mask_only and a small mask returns (almost) the
    trigger image itself; with safety checks on, the checker sees it, flags it and the image is black."""
    image = safety_trigger_image()  # 256 x 256, the size the demo checker was calibrated on
    mask = np.zeros((256, 256), np.uint8)
    mask[124:132, 124:132] = 255
    request = Text2ImageRequest(
        prompt="a cat", seed=0, width=None, height=None, image=image, mask=mask, inpaint_mask_only=True,
        strength=1.0, num_inference_steps=2, num_images=2,
    )
    unchecked, checked = checked_pipeline([request, dataclasses.replace(request, enable_safety_checks=True)])
    assert unchecked.nsfw == [False, False] and unchecked.images.max() == 255
    assert checked.nsfw == [True, True]
    assert checked.images.shape == (2, 256, 256, 3) and checked.images.max() == 0


def test_pipeline_passes_benign_results_unchanged(checked_pipeline) -> None:
    request = Text2ImageRequest(prompt="a boat", seed=3, width=64, height=64, num_images=2)
    plain, checked = checked_pipeline([request, dataclasses.replace(request, enable_safety_checks=True)])
    assert checked.nsfw == [False, False]
    assert torch.equal(plain.images, checked.images)
    assert "safety" in checked.timings
