"""fal-client, unmodified, through fal-ai/lcm with model="sdxl" against the real gateway + tritonserver:
text-to-image, inpainting, and SDXL requests queued together with SD1.5 ones (the lcm model routes each to
its pipeline; SDXL loads on its first request)."""

from __future__ import annotations

import base64
import io
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from tests.contract.test_lcm_modes_client import _data_uri, _mask, _scene

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lcm"


def _decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_sdxl_text_to_image(fal_client: ModuleType) -> None:
    args = {
        "model": "sdxl",
        "prompt": "a lighthouse at dusk",
        "seed": 7,
        "num_images": 2,
        "image_size": {"width": 128, "height": 96},
        "guidance_scale": 2.0,
        "sync_mode": True,
        "enable_safety_checks": True,
    }
    result = fal_client.run(ENDPOINT, arguments=args)
    assert result["seed"] == 7 and result["num_inference_steps"] == 4
    assert result["nsfw_content_detected"] == [False, False]
    assert [(i["width"], i["height"]) for i in result["images"]] == [(128, 96), (128, 96)]
    first, second = (_decode(i["url"]) for i in result["images"])
    assert first.shape == (96, 128, 3) and not np.array_equal(first, second)
    again = fal_client.run(ENDPOINT, arguments=args)
    assert np.array_equal(_decode(again["images"][0]["url"]), first)  # same seed, same image
    # The same request on SD1.5 is another model's image.
    sd15 = fal_client.run(ENDPOINT, arguments={**args, "model": "sdv1-5"})
    assert not np.array_equal(_decode(sd15["images"][0]["url"]), first)


def test_sdxl_inpainting_keeps_the_unmasked_pixels(fal_client: ModuleType) -> None:
    args = {
        "model": "sdxl",
        "prompt": "a black cat",
        "image_url": _data_uri(_scene(192, 128)),
        "mask_url": _data_uri(_mask(192, 128)),
        "strength": 0.8,
        "seed": 42,
        "inpaint_mask_only": True,
        "sync_mode": True,
    }
    result = fal_client.run(ENDPOINT, arguments=args)
    [image] = result["images"]
    assert (image["width"], image["height"]) == (192, 128)  # default size: the input image's
    pixels = _decode(image["url"]).astype(int)
    outside = np.asarray(_mask(192, 128)) < 128
    assert np.abs(pixels - np.asarray(_scene(192, 128)).astype(int))[outside].mean() < 3


def test_sdxl_and_sd15_queued_together(fal_client: ModuleType) -> None:
    """Queued jobs of both models (Triton may batch them into one execute): each gets its own model's
    image, equal to the same request run alone."""

    def args(model: str, seed: int) -> dict:
        return {
            "model": model,
            "prompt": "a red boat",
            "seed": seed,
            "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2,
            "sync_mode": True,
        }

    jobs = [(m, s) for s in (1, 2) for m in ("sdxl", "sdv1-5")]
    handles = [fal_client.submit(ENDPOINT, arguments=args(m, s)) for m, s in jobs]
    together = [_decode(h.get()["images"][0]["url"]) for h in handles]
    for (model, seed), image in zip(jobs, together, strict=True):
        alone = _decode(fal_client.run(ENDPOINT, arguments=args(model, seed))["images"][0]["url"])
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 4, (model, seed)  # JPEG of <= 1 level
