"""The safety checker stage, shared by every endpoint: uint8 images in, flagged ones blacked out, flags out.

What diffusers' Stable Diffusion pipelines do in `run_safety_checker`: the images as PIL go through the
checker's CLIPImageProcessor (resize 224 bicubic, center crop, normalize), the checker network scores each
against its concepts, and an image with any concept above threshold is replaced by a black image. fal
reports the flags as `nsfw_content_detected` (fal-ai/lcm) or `has_nsfw_concepts` (pixart, sote, lora).

    checker = load_safety_checker(settings)          # once, at model load (runners stay warm)
    images, flags = checker(images)                  # (N, H, W, 3) uint8 -> same, list of N bools
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts

# diffusers' StableDiffusionSafetyChecker.forward: a special-care hit lowers every concept threshold by this.
SPECIAL_CARE_ADJUSTMENT = 0.01


class SafetyChecker:
    def __init__(self, scores: Runner, feature_extractor: CLIPImageProcessor):
        self.scores, self.feature_extractor = scores, feature_extractor

    @classmethod
    def from_artifacts(cls, settings: Settings, artifacts: Artifacts) -> SafetyChecker:
        (spec,) = family_spec("safety_checker", "sd").load_networks()
        return cls(
            create_runner(settings, artifacts, spec),
            CLIPImageProcessor.from_pretrained(artifacts.feature_extractor_dir),
        )

    def flags(self, images: torch.Tensor) -> list[bool]:
        """(N, H, W, 3) uint8 -> one flag per image: True where the checker finds an unsafe concept."""
        if images.shape[0] == 0:
            return []
        pil = [Image.fromarray(image) for image in images.cpu().numpy()]
        clip_input = self.feature_extractor(pil, return_tensors="pt").pixel_values  # (N, 3, 224, 224)
        out = self.scores.run({"clip_input": clip_input.to(self.scores.device)})
        special = out["special_scores"].float().cpu().numpy()  # (N, 3): cosine - threshold
        concepts = out["concept_scores"].float().cpu().numpy()  # (N, 17)
        # diffusers' rule: scores rounded to 3 decimals; any special-care hit adjusts every concept score.
        adjustment = np.where((np.round(special, 3) > 0).any(axis=1), SPECIAL_CARE_ADJUSTMENT, 0.0)
        return [bool(hit) for hit in (np.round(concepts + adjustment[:, None], 3) > 0).any(axis=1)]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """(N, H, W, 3) uint8 -> the same images with every flagged one black (zeros), and the flags."""
        flags = self.flags(images)
        if any(flags):
            images = images.clone()
            images[torch.tensor(flags)] = 0
        return images, flags


def load_safety_checker(settings: Settings) -> SafetyChecker:
    """The checker named by models.toml [safety_checker.sd], building demo weights and exports if missing."""
    from ember.specs.artifacts import ensure_artifacts

    path = ensure_artifacts(settings, family="safety_checker", variant="sd", progress=False)
    return SafetyChecker.from_artifacts(settings, read_artifacts(path))
