"""fal-ai/lora's IC-Light fields, gateway side (the stage: ember.pipeline.ic_light).

fal's doc: `ic_light_model_url` "the IC Light model", `ic_light_image_url` "the IC Light model image" (the
foreground to relight), `ic_light_model_background_image_url` "the IC Light model background image ... a
background compatible with the model". So the valid combinations are: none of them; model + image (an "fc"
file, 8 input channels); model + image + background (an "fbc" file, 12 channels). Which one a file is shows
only once it is loaded: the Triton model answers a mismatch with a 422 naming the background field.

The offset file (a full UNet's worth of offsets: ~1.7 GB in fp32) is streamed to disk like a `model_name`
checkpoint (ember.gateway.checkpoints, kind "unet": safetensors checked from its header, pickles refused,
UNet key names required) into <EMBER_LORA_MODEL_ROOT>/checkpoints/<sha256>.safetensors, stored once per
content; only its path travels to Triton, which keys its patched UNets by that digest. The images, decoded
by the gateway, ride in MEDIA. OPTIONS:
    "ic_light": {"path": offset file path, "image": MEDIA index, "background": MEDIA index | null} | null
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.endpoints.base import MediaLoader
from ember.endpoints.common import InputError, check_url
from ember.endpoints.lora.schema import LoraInput

# SDXL bases refuse IC-Light for good (its offsets fit the SD1.5 UNet only; there is no SDXL IC-Light)
SD15_ONLY = (
    "ic_light_model_url: IC-Light models are offsets for the SD1.5 UNet (lllyasviel/IC-Light has no SDXL "
    "model), so they cannot run on an SDXL base model; use an SD1.5 model_name"
)
_FIELDS = ("ic_light_model_url", "ic_light_image_url", "ic_light_model_background_image_url")


def check_ic_light(inp: LoraInput) -> None:
    """422 for an incomplete combination or a bad URL. `loras`, `controlnets` and `ip_adapter` combine with
    IC-Light (on SD1.5 bases; SDXL bases refuse IC-Light: translate.check_sdxl_fields)."""
    given = [name for name in _FIELDS if getattr(inp, name)]
    if not given:
        return
    for name in given:
        check_url(getattr(inp, name), ("body", name))
    for name in ("ic_light_model_url", "ic_light_image_url"):
        if name not in given:
            raise InputError(
                ("body", name),
                f"{name} is required with {', '.join(given)}: IC-Light relights the image at ic_light_image_url "
                "with the IC-Light model at ic_light_model_url (plus a background image for 'fbc' models)",
                "missing",
            )


async def load_ic_light(
    inp: LoraInput, media: MediaLoader, media_arrays: list[np.ndarray]
) -> dict[str, Any] | None:
    """The offset file's path (streamed to the checkpoint directory) and the images' MEDIA indices (images
    appended to `media_arrays`)."""
    if not inp.ic_light_model_url or not inp.ic_light_image_url:
        return None
    path = await media.checkpoint(inp.ic_light_model_url, ("body", "ic_light_model_url"), kind="unet")
    entry: dict[str, Any] = {"path": path, "image": len(media_arrays), "background": None}
    media_arrays.append(await media.image(inp.ic_light_image_url, ("body", "ic_light_image_url")))
    if inp.ic_light_model_background_image_url:
        entry["background"] = len(media_arrays)
        loc = ("body", "ic_light_model_background_image_url")
        media_arrays.append(await media.image(inp.ic_light_model_background_image_url, loc))
    return entry


def ic_light_option(loaded: dict[str, Any] | None) -> dict[str, Any] | None:
    """OPTIONS "ic_light": the offset file's path and the images' MEDIA indices (no bytes: the file stays
    in the shared checkpoint directory)."""
    if loaded is None:
        return None
    return {"path": loaded["path"], "image": loaded["image"], "background": loaded["background"]}
