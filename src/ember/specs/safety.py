"""The Stable Diffusion safety checker as one exported network, and its tiny demo stand-in.

Real weights: `CompVis/stable-diffusion-safety-checker` (diffusers' StableDiffusionSafetyChecker, a CLIP
ViT-L/14 vision tower + projection, 17 concept and 3 "special care" embeddings with one threshold each) and
its CLIPImageProcessor (`preprocessor_config.json`, the feature extractor). Both sit at the root of that
repo, and so they do in the demo stand-in, so one loader serves both.

The exported graph stops at the scores: cosine similarity minus threshold, per concept. The decision rule
(round to 3 decimals; a special-care hit lowers every concept threshold by 0.01) is diffusers' Python code
and runs in ember.pipeline.safety on those scores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from torch import nn

from ember.specs.base import NetworkSpec, TensorSpec, randn_sample

# CLIP ViT input side after the feature extractor's resize + center crop.
CLIP_IMAGE_SIZE = 224


class SafetyScores(nn.Module):
    """clip_input (B, 3, 224, 224), CLIP-normalized -> special_scores (B, 3), concept_scores (B, 17):
    cosine similarity of the projected image embedding to each embedding, minus its threshold."""

    def __init__(self, checker: StableDiffusionSafetyChecker):
        super().__init__()
        self.checker = checker
        self.config = checker.config.to_dict()

    def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.checker
        image_embeds = nn.functional.normalize(c.visual_projection(c.vision_model(clip_input)[1]))  # (B, P)
        special = image_embeds @ nn.functional.normalize(c.special_care_embeds).t()  # (B, 3)
        concepts = image_embeds @ nn.functional.normalize(c.concept_embeds).t()  # (B, 17)
        return special - c.special_care_embeds_weights, concepts - c.concept_embeds_weights


def _load(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    checker = StableDiffusionSafetyChecker.from_pretrained(source, revision=revision, dtype=dtype)
    return SafetyScores(checker.eval())


def _static_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {"rgb": 3, "clip_size": CLIP_IMAGE_SIZE, "special": 3, "concepts": 17}


def _image_dims(batch: int, height: int, width: int) -> dict[str, int]:
    return {"batch": batch}  # the feature extractor brings every image to 224 x 224


SAFETY_CHECKER = NetworkSpec(
    name="safety_checker",
    subfolder="",  # the checker repo keeps config.json at its root
    version=1,
    inputs=(TensorSpec("clip_input", torch.float32, ("batch", "rgb", "clip_size", "clip_size")),),
    outputs=(
        TensorSpec("special_scores", torch.float32, ("batch", "special")),
        TensorSpec("concept_scores", torch.float32, ("batch", "concepts")),
    ),
    load=_load,
    static_dims=_static_dims,
    image_dims=_image_dims,
    sample=lambda spec, shape, generator: randn_sample(spec, shape, generator),
)

SAFETY_NETWORKS = (SAFETY_CHECKER,)


# --- the tiny demo stand-in -------------------------------------------------------------------------------

SEED = 0
# A checker on random weights flags nothing meaningful, so the demo gets one calibrated concept: concept 0
# is the embedding of `safety_trigger_image()` with threshold 1 - TRIGGER_RADIUS, so that image (and only
# images whose embedding lies within that cosine of it) fires. Every other threshold is 1.5, above any
# cosine: those concepts never fire. Measured on the tiny tower: a uniform-noise image has cosine ~0.98 to
# the trigger, flat and gradient images 0.56-0.96, so a radius of 0.002 separates them with room to spare.
TRIGGER_RADIUS = 0.002
NEVER = 1.5


def safety_trigger_image(height: int = 256, width: int = 256) -> np.ndarray:
    """(H, W, 3) uint8: a magenta / green checkerboard of 32 px squares, the demo checker's "unsafe" image."""
    yy, xx = np.mgrid[0:height, 0:width]
    on = ((yy // 32 + xx // 32) % 2) == 0
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[on] = (255, 0, 255)
    image[~on] = (0, 255, 0)
    return image


def build_tiny_safety_checker(directory: Path) -> Path:
    """The tiny StableDiffusionSafetyChecker + CLIPImageProcessor in the layout of the CompVis repo."""
    from transformers import CLIPConfig, CLIPImageProcessor

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        torch.manual_seed(SEED)
        config = CLIPConfig(
            text_config={  # unused by the checker, but CLIPConfig carries one; real: 768 wide, 12 layers
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 49408,
            },
            vision_config={  # real: ViT-L/14, 1024 wide, 24 layers, patch 14
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": CLIP_IMAGE_SIZE,
                "patch_size": 32,
            },
            projection_dim=32,  # real: 768
        )
        checker = StableDiffusionSafetyChecker(config).eval()
        # The real repo's preprocessor_config.json: resize shortest side to 224 (bicubic), center crop 224,
        # rescale to [0, 1], normalize with CLIP's mean / std.
        processor = CLIPImageProcessor(
            size={"shortest_edge": CLIP_IMAGE_SIZE},
            crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        )
        clip_input = processor(safety_trigger_image(), return_tensors="pt").pixel_values
        with torch.no_grad():
            trigger = checker.visual_projection(checker.vision_model(clip_input)[1])[0]  # (P,)
            checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape))
            checker.concept_embeds[0] = trigger
            checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape))
            checker.concept_embeds_weights.fill_(NEVER)
            checker.concept_embeds_weights[0] = 1.0 - TRIGGER_RADIUS
            checker.special_care_embeds_weights.fill_(NEVER)
        checker.save_pretrained(staging / "model", safe_serialization=True)
        processor.save_pretrained(staging / "model")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
