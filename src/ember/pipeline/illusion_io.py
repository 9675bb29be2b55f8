"""The `illusion_diffusion` Triton model's tensor contract (model_repository/illusion_diffusion/config.pbtxt)
as plain numpy arrays, kept out of model.py so it is tested without Triton. Inputs carry the batch
dimension of 1 that max_batch_size > 0 adds: scalars (1, 1), CONTROL_IMAGE (1, H, W, 3). Outputs too:
IMAGES (1, 1, H, W, 3), PROGRESS (1, 2), TIMINGS (1, 1)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.pipeline.illusion_diffusion import IllusionRequest, IllusionResult
from ember.pipeline.lcm_io import _pixels, _scalar, _text

INPUT_NAMES = (
    "PROMPT",
    "NEGATIVE_PROMPT",
    "SEED",
    "CONTROL_IMAGE",
    "GUIDANCE_SCALE",
    "CONTROLNET_CONDITIONING_SCALE",
    "CONTROL_GUIDANCE_START",
    "CONTROL_GUIDANCE_END",
    "SCHEDULER",
    "NUM_INFERENCE_STEPS",
    "WIDTH",
    "HEIGHT",
)

OUTPUT_NAMES = ("IMAGES", "PROGRESS", "TIMINGS")


@dataclass(frozen=True)
class IllusionDefaults:
    """Server defaults of the optional inputs: fal-ai/illusion-diffusion's own (size from models.toml)."""

    guidance_scale: float = 7.5
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    scheduler: str = "Euler"
    num_inference_steps: int = 40
    width: int = 1024
    height: int = 1024


def parse_illusion_request(
    arrays: Mapping[str, np.ndarray | None], defaults: IllusionDefaults, is_cancelled: Callable[[], bool]
) -> IllusionRequest:
    """An IllusionRequest from the model's input arrays; ValueError names the bad input."""
    prompt, seed = _scalar(arrays, "PROMPT"), _scalar(arrays, "SEED")
    image = _pixels(arrays, "CONTROL_IMAGE", 4)
    for name, value in (("PROMPT", prompt), ("SEED", seed), ("CONTROL_IMAGE", image)):
        if value is None:
            raise ValueError(f"{name} is required")

    def get(name: str, default: Any) -> Any:
        value = _scalar(arrays, name)
        return default if value is None else value

    return IllusionRequest(
        prompt=_text(prompt, "PROMPT"),
        control_image=image,  # type: ignore[arg-type]
        seed=int(seed),
        negative_prompt=_text(get("NEGATIVE_PROMPT", ""), "NEGATIVE_PROMPT"),
        guidance_scale=float(get("GUIDANCE_SCALE", defaults.guidance_scale)),
        controlnet_conditioning_scale=float(
            get("CONTROLNET_CONDITIONING_SCALE", defaults.controlnet_conditioning_scale)
        ),
        control_guidance_start=float(get("CONTROL_GUIDANCE_START", defaults.control_guidance_start)),
        control_guidance_end=float(get("CONTROL_GUIDANCE_END", defaults.control_guidance_end)),
        scheduler=_text(get("SCHEDULER", defaults.scheduler), "SCHEDULER"),
        num_inference_steps=int(get("NUM_INFERENCE_STEPS", defaults.num_inference_steps)),
        width=int(get("WIDTH", defaults.width)),
        height=int(get("HEIGHT", defaults.height)),
        is_cancelled=is_cancelled,
    )


def result_arrays(result: IllusionResult) -> dict[str, np.ndarray]:
    """IMAGES (1, 1, H, W, 3) uint8 (the gateway reads IMAGES as the final response), TIMINGS (1, 1) JSON."""
    if result.image is None:
        raise ValueError("a cancelled request has no image")
    return {
        "IMAGES": np.ascontiguousarray(result.image.numpy()[None, None]),
        "TIMINGS": np.array([[json.dumps(result.timings).encode()]], dtype=np.object_),
    }
