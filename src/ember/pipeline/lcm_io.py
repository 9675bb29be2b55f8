"""The `lcm` Triton model's tensor contract (model_repository/lcm/config.pbtxt) as plain numpy arrays.

Kept out of model.py so it is tested without Triton. Every input arrives with the batch dimension of 1
that max_batch_size > 0 adds: (1, 1). Outputs carry it too: IMAGES (1, N, H, W, 3), NSFW (1, N),
PROGRESS (1, 2), TIMINGS (1, 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.pipeline.requests import Text2ImageRequest, Text2ImageResult

INPUT_NAMES = (
    "PROMPT",
    "NEGATIVE_PROMPT",
    "SEED",
    "NUM_IMAGES",
    "NUM_INFERENCE_STEPS",
    "GUIDANCE_SCALE",
    "WIDTH",
    "HEIGHT",
)


@dataclass(frozen=True)
class LcmDefaults:
    """Server defaults for the optional inputs (fal-ai/lcm's own defaults; size from models.toml)."""

    num_images: int = 1
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    width: int = 512
    height: int = 512


def _scalar(arrays: Mapping[str, np.ndarray | None], name: str) -> Any:
    value = arrays.get(name)
    if value is None:
        return None
    if value.size != 1:
        raise ValueError(
            f"{name} must hold one value per request (shape [1, 1]), got shape {list(value.shape)}"
        )
    return value.reshape(-1)[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8") from exc
    return str(value)


def parse_lcm_request(
    arrays: Mapping[str, np.ndarray | None], defaults: LcmDefaults, is_cancelled: Callable[[], bool]
) -> Text2ImageRequest:
    """A Text2ImageRequest from the model's input arrays; ValueError names the bad input.

    Optional inputs that are absent take `defaults` (the gateway always sends the user's value or
    the endpoint's default, so these matter only to direct Triton clients).
    """
    prompt, seed = _scalar(arrays, "PROMPT"), _scalar(arrays, "SEED")
    if prompt is None:
        raise ValueError("PROMPT is required")
    if seed is None:
        raise ValueError("SEED is required")

    def get(name: str, default: Any) -> Any:
        value = _scalar(arrays, name)
        return default if value is None else value

    return Text2ImageRequest(
        prompt=_text(prompt, "PROMPT"),
        negative_prompt=_text(get("NEGATIVE_PROMPT", ""), "NEGATIVE_PROMPT"),
        seed=int(seed),
        num_images=int(get("NUM_IMAGES", defaults.num_images)),
        num_inference_steps=int(get("NUM_INFERENCE_STEPS", defaults.num_inference_steps)),
        guidance_scale=float(get("GUIDANCE_SCALE", defaults.guidance_scale)),
        width=int(get("WIDTH", defaults.width)),
        height=int(get("HEIGHT", defaults.height)),
        is_cancelled=is_cancelled,
    )


def progress_arrays(step: int, total: int) -> dict[str, np.ndarray]:
    return {"PROGRESS": np.array([[step, total]], dtype=np.int32)}


def result_arrays(result: Text2ImageResult) -> dict[str, np.ndarray]:
    """IMAGES (1, N, H, W, 3) uint8, NSFW (1, N) bool, TIMINGS (1, 1) JSON bytes."""
    if result.images is None:
        raise ValueError("a cancelled request has no images")
    return {
        "IMAGES": np.ascontiguousarray(result.images.numpy()[None]),
        "NSFW": np.array([result.nsfw], dtype=np.bool_),
        "TIMINGS": np.array([[json.dumps(result.timings).encode()]], dtype=np.object_),
    }
