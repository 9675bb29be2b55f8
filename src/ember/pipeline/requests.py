"""What goes into and comes out of a text-to-image pipeline, independent of Triton."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ember.pipeline.loras import LoraFile

# on_step(request index in the batch given to the pipeline, step done (1-based), total steps)
StepCallback = Callable[[int, int, int], None]


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Text2ImageRequest:
    prompt: str
    seed: int
    negative_prompt: str = ""
    num_images: int = 1
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    # None: the input image's size (fitted within 1024 px); text-to-image always names a size.
    width: int | None = 512
    height: int | None = 512
    # Image-to-image: the input image (H, W, 3) uint8 RGB; with `mask` (H, W) uint8, white = fill, it is
    # inpainting. `strength`: how far from the input image the result may move (1 = start from noise).
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float = 0.8
    # Inpainting only: the output keeps the input image's pixels exactly wherever the mask is black.
    inpaint_mask_only: bool = False
    # Inpainting only: steered by the inpaint ControlNet too (fal-ai/lcm; ember.pipeline.lcm_controlnet).
    controlnet_inpaint: bool = False
    enable_safety_checks: bool = False
    model: str = "sdv1-5"
    # fal-ai/lcm lora_url + lora_scale: (parsed LoRA file, fuse scale) pairs fused into the networks for this
    # request (ember.pipeline.lcm_lora); requests batch together only with the same set (`lora_key`).
    loras: tuple[tuple[LoraFile, float], ...] = field(default=(), compare=False, repr=False)
    # Polled once per denoising step; True drops the request from its batch.
    is_cancelled: Callable[[], bool] = field(default=_never, compare=False)

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """The LoRA set by content: (file digest, scale) pairs; () without LoRA."""
        return tuple((lora.digest, float(scale)) for lora, scale in self.loras)

    @property
    def mode(self) -> str:
        """"text", "image" (image-to-image) or "inpaint"."""
        if self.image is None:
            return "text"
        return "image" if self.mask is None else "inpaint"


@dataclass
class Text2ImageResult:
    images: torch.Tensor | None  # (num_images, H, W, 3) uint8 RGB; None when cancelled
    # One flag per image: True where the safety checker fired (that image is black). All False when the
    # request did not ask for safety checks.
    nsfw: list[bool]
    timings: dict[str, float]  # seconds per stage of the batch this request ran in, and "total"
    cancelled: bool = False
    # Things the caller may want to log, e.g. that negative_prompt was ignored (LCM has no negative branch).
    notes: list[str] = field(default_factory=list)

    @property
    def negative_prompt_ignored(self) -> bool:
        return NEGATIVE_PROMPT_IGNORED in self.notes


NEGATIVE_PROMPT_IGNORED = "negative_prompt_ignored"
