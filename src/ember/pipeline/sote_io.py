"""The `sote_diffusion` Triton model's tensor contract (model_repository/sote_diffusion/config.pbtxt) as
plain numpy arrays, tested without Triton. Inputs arrive as (1, 1) (max_batch_size > 0 adds the batch
dimension); outputs are lcm's: IMAGES (1, N, H, W, 3), NSFW (1, N), PROGRESS (1, 2), TIMINGS (1, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# The scalar/text readers and the output encoders are the same contract as lcm's: one implementation.
from ember.pipeline.lcm_io import _scalar, _text, progress_arrays, result_arrays
from ember.pipeline.stable_cascade import CascadeRequest

INPUT_NAMES = (
    "PROMPT",
    "NEGATIVE_PROMPT",
    "SEED",
    "NUM_IMAGES",
    "FIRST_STAGE_STEPS",
    "SECOND_STAGE_STEPS",
    "GUIDANCE_SCALE",
    "SECOND_STAGE_GUIDANCE_SCALE",
    "WIDTH",
    "HEIGHT",
    "ENABLE_SAFETY_CHECKER",
)
OUTPUT_NAMES = ("IMAGES", "NSFW", "PROGRESS", "TIMINGS")

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "parse_sote_request", "progress_arrays", "result_arrays"]


def parse_sote_request(
    arrays: Mapping[str, np.ndarray | None],
    defaults: CascadeRequest,
    is_cancelled: Callable[[], bool],
) -> CascadeRequest:
    """A CascadeRequest from the model's input arrays; ValueError names the bad input.

    Absent optional inputs take `defaults` (fal's defaults; the size from models.toml). The gateway always
    sends every input, so the defaults matter only to direct Triton clients.
    """
    prompt, seed = _scalar(arrays, "PROMPT"), _scalar(arrays, "SEED")
    if prompt is None:
        raise ValueError("PROMPT is required")
    if seed is None:
        raise ValueError("SEED is required")

    def get(name: str, default: Any) -> Any:
        value = _scalar(arrays, name)
        return default if value is None else value

    return CascadeRequest(
        prompt=_text(prompt, "PROMPT"),
        negative_prompt=_text(get("NEGATIVE_PROMPT", defaults.negative_prompt), "NEGATIVE_PROMPT"),
        seed=int(seed),
        num_images=int(get("NUM_IMAGES", defaults.num_images)),
        num_inference_steps=int(get("FIRST_STAGE_STEPS", defaults.num_inference_steps)),
        second_stage_steps=int(get("SECOND_STAGE_STEPS", defaults.second_stage_steps)),
        guidance_scale=float(get("GUIDANCE_SCALE", defaults.guidance_scale)),
        second_stage_guidance_scale=float(
            get("SECOND_STAGE_GUIDANCE_SCALE", defaults.second_stage_guidance_scale)
        ),
        width=int(get("WIDTH", defaults.width)),
        height=int(get("HEIGHT", defaults.height)),
        enable_safety_checker=bool(get("ENABLE_SAFETY_CHECKER", defaults.enable_safety_checker)),
        is_cancelled=is_cancelled,
    )
