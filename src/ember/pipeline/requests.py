"""What goes into and comes out of a text-to-image pipeline, independent of Triton."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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
    width: int = 512
    height: int = 512
    # Polled once per denoising step; True drops the request from its batch.
    is_cancelled: Callable[[], bool] = field(default=_never, compare=False)


@dataclass
class Text2ImageResult:
    images: torch.Tensor | None  # (num_images, H, W, 3) uint8 RGB; None when cancelled
    # One flag per image. All False: the safety checker is a later issue, nothing is checked yet.
    nsfw: list[bool]
    timings: dict[str, float]  # seconds per stage of the batch this request ran in, and "total"
    cancelled: bool = False
    # Things the caller may want to log, e.g. that negative_prompt was ignored (LCM has no negative branch).
    notes: list[str] = field(default_factory=list)

    @property
    def negative_prompt_ignored(self) -> bool:
        return NEGATIVE_PROMPT_IGNORED in self.notes


NEGATIVE_PROMPT_IGNORED = "negative_prompt_ignored"
