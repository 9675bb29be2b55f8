"""The `pixart_sigma` Triton model's tensor contract (model_repository/pixart_sigma/config.pbtxt) as numpy.

Kept out of model.py so it is tested without Triton. Inputs arrive with the batch dimension of 1 that
max_batch_size > 0 adds: (1, 1). Outputs are the lcm model's (ember.pipeline.lcm_io): IMAGES (1, N, H, W, 3),
NSFW (1, N), PROGRESS (1, 2), TIMINGS (1, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.pipeline.lcm_io import _scalar, _text, progress_arrays, result_arrays
from ember.pipeline.pixart_sigma import PixArtRequest
from ember.pipeline.pixart_styles import NO_STYLE

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "PixArtDefaults",
    "parse_pixart_request",
    "progress_arrays",
    "result_arrays",
]

INPUT_NAMES = (
    "PROMPT",
    "NEGATIVE_PROMPT",
    "SEED",
    "NUM_IMAGES",
    "NUM_INFERENCE_STEPS",
    "GUIDANCE_SCALE",
    "WIDTH",
    "HEIGHT",
    "STYLE",
    "SCHEDULER",
    "ENABLE_SAFETY_CHECKER",
)
OUTPUT_NAMES = ("IMAGES", "NSFW", "PROGRESS", "TIMINGS")


@dataclass(frozen=True)
class PixArtDefaults:
    """Server defaults for the optional inputs: fal-ai/pixart-sigma's own (size from models.toml)."""

    num_images: int = 1
    num_inference_steps: int = 35
    guidance_scale: float = 4.5
    width: int = 1024
    height: int = 1024
    style: str = NO_STYLE
    scheduler: str = "DPM-SOLVER"
    enable_safety_checker: bool = False


def parse_pixart_request(
    arrays: Mapping[str, np.ndarray | None], defaults: PixArtDefaults, is_cancelled: Callable[[], bool]
) -> PixArtRequest:
    """A PixArtRequest from the model's input arrays; ValueError names the bad input.

    Optional inputs that are absent take `defaults` (the gateway always sends every input, so these matter
    only to direct Triton clients).
    """
    prompt, seed = _scalar(arrays, "PROMPT"), _scalar(arrays, "SEED")
    if prompt is None:
        raise ValueError("PROMPT is required")
    if seed is None:
        raise ValueError("SEED is required")

    def get(name: str, default: Any) -> Any:
        value = _scalar(arrays, name)
        return default if value is None else value

    return PixArtRequest(
        prompt=_text(prompt, "PROMPT"),
        negative_prompt=_text(get("NEGATIVE_PROMPT", ""), "NEGATIVE_PROMPT"),
        seed=int(seed),
        num_images=int(get("NUM_IMAGES", defaults.num_images)),
        num_inference_steps=int(get("NUM_INFERENCE_STEPS", defaults.num_inference_steps)),
        guidance_scale=float(get("GUIDANCE_SCALE", defaults.guidance_scale)),
        width=int(get("WIDTH", defaults.width)),
        height=int(get("HEIGHT", defaults.height)),
        style=_text(get("STYLE", defaults.style), "STYLE"),
        scheduler=_text(get("SCHEDULER", defaults.scheduler), "SCHEDULER"),
        enable_safety_checker=bool(get("ENABLE_SAFETY_CHECKER", defaults.enable_safety_checker)),
        is_cancelled=is_cancelled,
    )
