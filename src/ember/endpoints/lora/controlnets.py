"""fal-ai/lora `controlnets` / `controlnet_guess_mode` at the gateway: submit-time checks, fetching each
control image and mask through the MediaLoader (SSRF-safe, size-checked, decoded with limits) into MEDIA,
and the OPTIONS entries that index them (read back by ember.pipeline.lora_controlnets.parse_controlnets).

`path` follows model_name's rules: a Hugging Face id, or a directory under EMBER_LORA_MODEL_ROOT, or
single-file weights: an http(s) / data: URL (streamed to the checkpoint store, checked as safetensors with
ControlNet tensor names, sent as its path) or a .safetensors file under the root. `config_url` pairs such
a file with its config.json (fetched here, at most 64 KiB, sent in OPTIONS as "config"); without it the
Triton side takes the built-in full-size config of the weights' family (SD1.5 / SDXL ControlNet) and says
to send config_url when they do not fit. An HF id or a directory carries its own config.json, so
config_url is refused beside one (and `variant`, a file inside a directory, beside a single file).
`ip_adapter_index` (InstantID's IdentityNet: the ControlNet reads ip_adapter[k]'s projected face tokens
instead of the prompt, ember.pipeline.instantid) must index the request's ip_adapter list; sent as is.
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

_URL = ("http://", "https://", "data:")
# diffusion_pytorch_model.<variant>.safetensors: a plain word, nothing path-like.
_VARIANT = re.compile(r"[A-Za-z0-9_-]{1,32}")


def single_file(path: str) -> bool:
    """`path` names single-file ControlNet weights (a URL, or a .safetensors file under the root)."""
    return path.startswith(_URL) or path.endswith(".safetensors")


def check_controlnets(inp: LoraInput, root: Path, check_path: Callable[..., None]) -> None:
    """Raise InputError at the first ControlNet field this server cannot serve as asked. `check_path`:
    translate.check_model_name (value, loc, root, single_file)."""
    for i, c in enumerate(inp.controlnets):
        loc = ("body", "controlnets", i)
        check_path(c.path, (*loc, "path"), root, single_file(c.path))
        if c.config_url is not None:
            if not single_file(c.path):
                raise InputError(
                    (*loc, "config_url"),
                    "config_url pairs single-file ControlNet weights (`path` a .safetensors URL or file) with "
                    "their config.json; a Hugging Face id or a ControlNet directory carries its own "
                    "config.json: leave config_url out",
                    "not_supported",
                )
            check_url(c.config_url, (*loc, "config_url"))
        if c.variant is not None and single_file(c.path):
            raise InputError(
                (*loc, "variant"),
                "variant picks a weights file inside a ControlNet directory; a single-file path is that "
                "file already: leave variant out",
            )
        if c.ip_adapter_index is not None and not 0 <= c.ip_adapter_index < len(inp.ip_adapter):
            raise InputError(
                (*loc, "ip_adapter_index"),
                f"{c.ip_adapter_index} must index the request's ip_adapter list ({len(inp.ip_adapter)} "
                "adapter(s)): an InstantID ControlNet reads the face tokens of the IP-Adapter it names",
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
        path = c.path
        if path.startswith(_URL):  # streamed under <model root>/checkpoints/, checked; sent as its path
            path = await media.checkpoint(path, (*loc, "path"), kind="controlnet")
        config = None if c.config_url is None else await media.json(c.config_url, (*loc, "config_url"))
        image = await media.image(c.image_url, (*loc, "image_url"))
        arrays.append(image)
        entry = {
            "path": path,
            "variant": c.variant,
            "config": config,
            "image": len(arrays) - 1,
            "mask": None,
            "conditioning_scale": c.conditioning_scale,
            "start_percentage": c.start_percentage,
            "end_percentage": c.end_percentage,
            "ip_adapter_index": c.ip_adapter_index,
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
