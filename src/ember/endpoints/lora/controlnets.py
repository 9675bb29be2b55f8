"""fal-ai/lora `controlnets` / `controlnet_guess_mode` at the gateway: submit-time checks, fetching each
control image and mask through the MediaLoader (SSRF-safe, size-checked, decoded with limits) into MEDIA,
and the OPTIONS entries that index them (read back by ember.pipeline.lora_controlnets.parse_controlnets).

`path` follows model_name's rules: a Hugging Face id, or a directory under EMBER_LORA_MODEL_ROOT.
`config_url` is refused: fal uses it to pair single-file ControlNet weights (a URL in `path`) with their
config.json, and single-file weights are not loaded by this server yet; an HF id or a model directory
carries its own config.json, so there is nothing for config_url to add.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ember.endpoints.base import MediaLoader
from ember.endpoints.common import InputError, check_url
from ember.endpoints.lora.schema import LoraInput

_NOT_YET = "is not supported yet by this server"
# diffusion_pytorch_model.<variant>.safetensors: a plain word, nothing path-like.
_VARIANT = re.compile(r"[A-Za-z0-9_-]{1,32}")


def check_controlnets(
    inp: LoraInput, root: Path, check_path: Callable[[str, tuple[Any, ...], Path], None]
) -> None:
    """Raise InputError at the first ControlNet field this server cannot serve as asked."""
    for i, c in enumerate(inp.controlnets):
        loc = ("body", "controlnets", i)
        check_path(c.path, (*loc, "path"), root)
        if c.config_url is not None:
            raise InputError(
                (*loc, "config_url"),
                "config_url pairs single-file ControlNet weights with their config, which this server does "
                "not load yet; give `path` as a Hugging Face id or a directory under the model root "
                "(it carries its own config.json) and leave config_url out",
                "not_supported",
            )
        if c.ip_adapter_index is not None:
            raise InputError(
                (*loc, "ip_adapter_index"),
                f"InstantID ControlNets (ip_adapter_index) {_NOT_YET}",
                "not_supported",
            )
        if c.variant is not None and not _VARIANT.fullmatch(c.variant):
            raise InputError((*loc, "variant"), "must be a weights variant name such as 'fp16'")
        check_url(c.image_url, (*loc, "image_url"))
        check_url(c.mask_url, (*loc, "mask_url"))
        if c.start_percentage >= c.end_percentage:
            raise InputError(
                (*loc, "end_percentage"),
                f"end_percentage ({c.end_percentage}) must be above start_percentage ({c.start_percentage})",
            )


async def load_controlnets(
    inp: LoraInput, media: MediaLoader, arrays: list[np.ndarray]
) -> list[dict[str, Any]]:
    """Fetch each control image ((H, W, 3) uint8) and mask ((H, W) uint8 grey), append them to `arrays`
    (the request's MEDIA), and return the OPTIONS "controlnets" entries indexing them."""
    entries = []
    for i, c in enumerate(inp.controlnets):
        loc = ("body", "controlnets", i)
        image = await media.image(c.image_url, (*loc, "image_url"))
        arrays.append(image)
        entry = {
            "path": c.path,
            "variant": c.variant,
            "image": len(arrays) - 1,
            "mask": None,
            "conditioning_scale": c.conditioning_scale,
            "start_percentage": c.start_percentage,
            "end_percentage": c.end_percentage,
        }
        if c.mask_url is not None:
            mask = await media.image(c.mask_url, (*loc, "mask_url"), mode="L")
            if mask.shape != image.shape[:2]:
                raise InputError(
                    (*loc, "mask_url"),
                    f"the mask ({mask.shape[1]}x{mask.shape[0]}) must have the control image's size "
                    f"({image.shape[1]}x{image.shape[0]})",
                )
            arrays.append(mask)
            entry["mask"] = len(arrays) - 1
        entries.append(entry)
    return entries
