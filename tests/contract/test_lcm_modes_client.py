"""fal-client, unmodified, through every fal-ai/lcm mode against the real gateway + tritonserver: the seed
document's inpainting example (its URLs replaced by data URIs of PIL-made images), image-to-image, and
the schema errors of the image fields."""

from __future__ import annotations

import base64
import io
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lcm"


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def _scene(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], -1).astype(np.uint8)
    return Image.fromarray(pixels)


def _mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, mode="L")


# The example payload of fal's fal-ai/lcm page (shared/seeds), inpainting, URLs swapped for data URIs.
SEED_EXAMPLE = {
    "model": "sdv1-5",
    "prompt": "a black cat with glowing eyes, cute, adorable, disney, pixar, highly detailed, 8k",
    "image_url": _data_uri(_scene(192, 128)),
    "mask_url": _data_uri(_mask(192, 128)),
    "strength": 0.8,
    "negative_prompt": "cartoon, illustration, animation. face. male, female",
    "seed": 42,
    "guidance_scale": 1,
    "num_inference_steps": 4,
    "num_images": 1,
    "enable_safety_checks": True,
    "lora_scale": 1,
}


def test_seed_inpainting_example(fal_client: ModuleType) -> None:
    result = fal_client.run(ENDPOINT, arguments={**SEED_EXAMPLE, "sync_mode": True})
    assert result["seed"] == 42 and result["num_inference_steps"] == 4
    assert result["nsfw_content_detected"] == [False]
    [image] = result["images"]
    assert (image["width"], image["height"]) == (192, 128)  # default size: the input image's
    assert _decode(image["url"]).shape == (128, 192, 3)
    assert "safety" in result["timings"]
    # inpaint_mask_only: outside the mask the output is the input image (up to JPEG's loss).
    kept = fal_client.run(ENDPOINT, arguments={**SEED_EXAMPLE, "sync_mode": True, "inpaint_mask_only": True})
    pixels = _decode(kept["images"][0]["url"]).astype(int)
    outside = np.asarray(_mask(192, 128)) < 128
    original = np.asarray(_scene(192, 128)).astype(int)
    assert np.abs(pixels - original)[outside].mean() < 3


def test_image_to_image_with_a_size(fal_client: ModuleType) -> None:
    args = {"prompt": "a house", "image_url": SEED_EXAMPLE["image_url"], "strength": 0.6, "seed": 1,
            "image_size": {"width": 128, "height": 64}, "sync_mode": True}
    first = fal_client.run(ENDPOINT, arguments=args)
    assert (first["images"][0]["width"], first["images"][0]["height"]) == (128, 64)
    again = fal_client.run(ENDPOINT, arguments=args)
    assert np.array_equal(_decode(first["images"][0]["url"]), _decode(again["images"][0]["url"]))


@pytest.mark.parametrize(
    ("arguments", "loc"),
    [
        ({"prompt": "x", "mask_url": SEED_EXAMPLE["mask_url"]}, ["body", "mask_url"]),
        ({"prompt": "x", "image_url": SEED_EXAMPLE["image_url"], "mask_url": _data_uri(_mask(64, 64))},
         ["body", "mask_url"]),
        ({"prompt": "x", "image_url": "data:image/png;base64,AAAA"}, ["body", "image_url"]),
        ({"prompt": "x", "image_url": SEED_EXAMPLE["image_url"], "strength": 1.5}, ["body", "strength"]),
    ],
    ids=["mask-without-image", "mask-size-mismatch", "undecodable-image", "strength-out-of-range"],
)
def test_image_field_errors_are_422_at_the_field(fal_client: ModuleType, arguments: dict, loc: list) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=arguments)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert detail[0]["loc"] == loc, detail
