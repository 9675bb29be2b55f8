"""The `lcm` Triton model's tensor contract (model_repository/lcm/config.pbtxt) as plain numpy arrays.

Kept out of model.py so it is tested without Triton. Every input arrives with the batch dimension of 1
that max_batch_size > 0 adds: scalars (1, 1), IMAGE (1, H, W, 3), MASK (1, H, W). Outputs carry it too:
IMAGES (1, N, H, W, 3), NSFW (1, N), PROGRESS (1, 2), TIMINGS (1, 1).

Modes follow from what is present: IMAGE makes it image-to-image, IMAGE + MASK inpainting. Without
WIDTH / HEIGHT an image request takes the image's size (fitted within 1024 px). LORA (the safetensors bytes)
with LORA_SCALE fuses a LoRA for that request (ember.pipeline.lcm_lora).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.pipeline.lora_io import LoraFiles
from ember.pipeline.loras import LoraFile
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
    "MODEL",
    "IMAGE",
    "MASK",
    "STRENGTH",
    "INPAINT_MASK_ONLY",
    "CONTROLNET_INPAINT",
    "ENABLE_SAFETY_CHECKS",
    "LORA",
    "LORA_SCALE",
)


@dataclass(frozen=True)
class LcmDefaults:
    """Server defaults for the optional inputs (fal-ai/lcm's own defaults; size from models.toml)."""

    num_images: int = 1
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    width: int = 512
    height: int = 512
    strength: float = 0.8
    enable_safety_checks: bool = True  # fal's default
    model: str = "sdv1-5"


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
    arrays: Mapping[str, np.ndarray | None],
    defaults: LcmDefaults,
    is_cancelled: Callable[[], bool],
    lora_files: LoraFiles | None = None,
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

    image, mask = _pixels(arrays, "IMAGE", 4), _pixels(arrays, "MASK", 3)
    width, height = get("WIDTH", None), get("HEIGHT", None)
    if image is None or (width is not None and height is not None):
        width = defaults.width if width is None else width
        height = defaults.height if height is None else height
    else:  # an image request without a full size: the image's (the pipeline resolves it)
        width = height = None
    loras = _lora(arrays, lora_files, float(get("LORA_SCALE", 1.0)))
    return Text2ImageRequest(
        prompt=_text(prompt, "PROMPT"),
        negative_prompt=_text(get("NEGATIVE_PROMPT", ""), "NEGATIVE_PROMPT"),
        seed=int(seed),
        num_images=int(get("NUM_IMAGES", defaults.num_images)),
        num_inference_steps=int(get("NUM_INFERENCE_STEPS", defaults.num_inference_steps)),
        guidance_scale=float(get("GUIDANCE_SCALE", defaults.guidance_scale)),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        image=image,
        mask=mask,
        strength=float(get("STRENGTH", defaults.strength)),
        inpaint_mask_only=bool(get("INPAINT_MASK_ONLY", False)),
        controlnet_inpaint=bool(get("CONTROLNET_INPAINT", False)),
        enable_safety_checks=bool(get("ENABLE_SAFETY_CHECKS", defaults.enable_safety_checks)),
        model=_text(get("MODEL", defaults.model), "MODEL"),
        loras=loras,
        is_cancelled=is_cancelled,
    )


def _lora(
    arrays: Mapping[str, np.ndarray | None], lora_files: LoraFiles | None, scale: float
) -> tuple[tuple[LoraFile, float], ...]:
    """LORA (1, 1) safetensors bytes (fal's lora_url, fetched and checked by the gateway) -> ((file, scale),),
    parsed once per distinct file by `lora_files`; () when absent."""
    blob = _scalar(arrays, "LORA")
    if blob is None:
        return ()
    if lora_files is None:
        raise ValueError("LORA: this model was set up without LoRA support")
    if not isinstance(blob, bytes) or not blob:
        raise ValueError("LORA must be the bytes of a .safetensors file")
    try:
        return ((lora_files.get(blob), scale),)
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise ValueError(f"LORA is not a LoRA .safetensors file: {exc}") from exc


def _pixels(arrays: Mapping[str, np.ndarray | None], name: str, ndim: int) -> np.ndarray | None:
    """IMAGE (1, H, W, 3) / MASK (1, H, W) uint8 -> the array without its batch dimension."""
    value = arrays.get(name)
    if value is None:
        return None
    if value.ndim != ndim or value.shape[0] != 1 or value.dtype != np.uint8:
        want = "[1, H, W, 3]" if ndim == 4 else "[1, H, W]"
        raise ValueError(f"{name} must be uint8 of shape {want}, got {value.dtype} {list(value.shape)}")
    return np.ascontiguousarray(value[0])


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
