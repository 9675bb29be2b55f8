"""fal-client, unmodified, asks fal-ai/lcm for controlnet_inpaint (image and mask as data URIs) against the
real gateway + tritonserver: the seed document's inpainting example with the option on, with and without
inpaint_mask_only; the ControlNet must change the fill and nothing outside it."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from tests.contract.test_lcm_modes_client import ENDPOINT, SEED_EXAMPLE, _decode, _mask, _scene

pytestmark = pytest.mark.e2e

ARGS = {**SEED_EXAMPLE, "sync_mode": True, "controlnet_inpaint": True}


def test_controlnet_inpaint_through_fal_client(fal_client: ModuleType) -> None:
    steered = fal_client.run(ENDPOINT, arguments=ARGS)
    assert steered["seed"] == 42 and steered["nsfw_content_detected"] == [False]
    [image] = steered["images"]
    assert (image["width"], image["height"]) == (192, 128)  # the input image's size
    pixels = _decode(image["url"]).astype(int)
    plain = _decode(
        fal_client.run(ENDPOINT, arguments={**ARGS, "controlnet_inpaint": False})["images"][0]["url"]
    )
    inside = np.asarray(_mask(192, 128)) >= 128
    assert np.abs(pixels - plain.astype(int))[inside].mean() > 2  # the ControlNet steered the fill

    kept = fal_client.run(ENDPOINT, arguments={**ARGS, "inpaint_mask_only": True})
    kept_pixels = _decode(kept["images"][0]["url"]).astype(int)
    original = np.asarray(_scene(192, 128)).astype(int)
    assert np.abs(kept_pixels - original)[~inside].mean() < 3  # JPEG's loss only
    assert np.abs(kept_pixels - pixels)[inside].mean() < 3  # the same fill
