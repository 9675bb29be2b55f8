"""fal-ai/lora's IC-Light fields, gateway side (the stage: ember.pipeline.ic_light).

fal's doc: `ic_light_model_url` "the IC Light model", `ic_light_image_url` "the IC Light model image" (the
foreground to relight), `ic_light_model_background_image_url` "the IC Light model background image ... a
background compatible with the model". So the valid combinations are: none of them; model + image (an "fc"
file, 8 input channels); model + image + background (an "fbc" file, 12 channels). Which one a file is shows
only once it is loaded: the Triton model answers a mismatch with a 422 naming the background field.

The offset file is fetched and checked as safetensors like a LoRA (pickles refused) and rides in LORA_FILES
after the LoRAs and embeddings; the images, decoded by the gateway, ride in MEDIA. OPTIONS:
    "ic_light": {"file": LORA_FILES index, "image": MEDIA index, "background": MEDIA index | null} | null
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.endpoints.base import MediaLoader
from ember.endpoints.common import InputError, check_url
from ember.endpoints.lora.schema import LoraInput

_FIELDS = ("ic_light_model_url", "ic_light_image_url", "ic_light_model_background_image_url")


def check_ic_light(inp: LoraInput) -> None:
    """422 for an incomplete combination, a bad URL, or IC-Light with what it cannot be combined with yet."""
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
    for name, on in (("loras", inp.loras), ("controlnets", inp.controlnets), ("ip_adapter", inp.ip_adapter)):
        if on:
            raise InputError(
                ("body", name),
                f"{name} together with IC-Light is not supported yet by this server; send them separately",
                "not_supported",
            )


async def load_ic_light(
    inp: LoraInput, media: MediaLoader, media_arrays: list[np.ndarray]
) -> dict[str, Any] | None:
    """The offset file's bytes and the images' MEDIA indices (images appended to `media_arrays`)."""
    if not inp.ic_light_model_url or not inp.ic_light_image_url:
        return None
    weights = await media.weights(inp.ic_light_model_url, ("body", "ic_light_model_url"))
    entry: dict[str, Any] = {"weights": weights.data, "image": len(media_arrays), "background": None}
    media_arrays.append(await media.image(inp.ic_light_image_url, ("body", "ic_light_image_url")))
    if inp.ic_light_model_background_image_url:
        entry["background"] = len(media_arrays)
        loc = ("body", "ic_light_model_background_image_url")
        media_arrays.append(await media.image(inp.ic_light_model_background_image_url, loc))
    return entry


def ic_light_option(loaded: dict[str, Any] | None, blobs: list[bytes]) -> dict[str, Any] | None:
    """OPTIONS "ic_light", appending the offset file to `blobs` (LORA_FILES)."""
    if loaded is None:
        return None
    blobs.append(loaded["weights"])
    return {"file": len(blobs) - 1, "image": loaded["image"], "background": loaded["background"]}
