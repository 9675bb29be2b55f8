"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver (fal-ai/illusion-diffusion)."""

from __future__ import annotations

import base64
import io
import time
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.contract.status_logs import log_messages

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/illusion-diffusion"


def _pattern() -> str:
    """A PIL-made stand-in for fal's pattern.png (no network here): concentric squares, as a data URI."""
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for i, inset in enumerate(range(0, 48, 8)):
        draw.rectangle((inset, inset, 95 - inset, 95 - inset), fill=(0, 0, 0) if i % 2 else (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# The seed document's example payload (fal-schemas.md §6), with the image_url replaced by a data URI.
SEED_EXAMPLE = {
    "image_url": _pattern(),
    "prompt": "(masterpiece:1.4), (best quality), (detailed), Medieval village scene with busy streets and "
    "castle in the distance",
    "negative_prompt": "(worst quality, poor details:1.4), lowres, (artist name, signature, watermark:1.4), "
    "bad-artist-anime, bad_prompt_version2, bad-hands-5, ng_deepnegative_v1_75t",
    "guidance_scale": 7.5,
    "controlnet_conditioning_scale": 1,
    "control_guidance_end": 1,
    "scheduler": "Euler",
    "num_inference_steps": 40,
    "image_size": "square_hd",
}


def _download(url: str, cafile: str) -> Image.Image:
    response = httpx.get(url, verify=cafile, timeout=30)
    response.raise_for_status()
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


# The example asks square_hd (1024 x 1024). Measured here (2 shared CPU cores, tiny models, torch): 40 steps
# at 1024^2 took ~515 s end to end (16,384-token attention at the first level, CFG batch 2, UNet +
# ControlNet), far over CI's budget, so CI runs the example at 128 x 128: every other field as fal's.
CI_SIZE = {"width": 128, "height": 128}


def test_seed_example_40_steps(fal_client: ModuleType, client_env) -> None:
    """The example: 40 Euler steps with CFG and the ControlNet, on the tiny models (at CI_SIZE)."""
    updates = []
    start = time.perf_counter()
    result = fal_client.subscribe(
        ENDPOINT, arguments={**SEED_EXAMPLE, "image_size": CI_SIZE}, with_logs=True,
        on_queue_update=updates.append,
    )
    elapsed = time.perf_counter() - start
    print(f"illusion 128x128 40 steps: {elapsed:.1f}s end to end")
    assert set(result) == {"image", "seed"}
    image = result["image"]
    assert (image["width"], image["height"]) == (128, 128)
    assert image["content_type"] == "image/png" and image["file_name"].endswith(".png")
    downloaded = _download(image["url"], client_env["SSL_CERT_FILE"])
    assert downloaded.size == (128, 128) and downloaded.format == "PNG"
    assert image["file_size"] > 0 and isinstance(result["seed"], int)
    messages = log_messages(fal_client, updates)
    # Per-step progress reached the client as logs (which steps depends on when the client polled).
    assert any(m.startswith("step ") and m.endswith("/40") for m in messages), messages


def test_same_seed_same_pixels_and_controls_matter(fal_client: ModuleType, client_env) -> None:
    args = {**SEED_EXAMPLE, "seed": 99, "num_inference_steps": 3, "image_size": {"width": 128, "height": 96},
            "scheduler": "DPM++ Karras SDE"}
    first, second = fal_client.run(ENDPOINT, arguments=args), fal_client.run(ENDPOINT, arguments=args)
    assert first["seed"] == second["seed"] == 99
    a = np.asarray(_download(first["image"]["url"], client_env["SSL_CERT_FILE"]))
    b = np.asarray(_download(second["image"]["url"], client_env["SSL_CERT_FILE"]))
    assert a.shape == (96, 128, 3) and np.array_equal(a, b)
    off = fal_client.run(ENDPOINT, arguments={**args, "controlnet_conditioning_scale": 0})
    assert not np.array_equal(a, np.asarray(_download(off["image"]["url"], client_env["SSL_CERT_FILE"])))


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"image_url": None}, ["body", "image_url"]),
        ({"scheduler": "DDIM"}, ["body", "scheduler"]),
        ({"num_inference_steps": 81}, ["body", "num_inference_steps"]),
        ({"guidance_scale": 51}, ["body", "guidance_scale"]),
        ({"control_guidance_end": 1.5}, ["body", "control_guidance_end"]),
        ({"control_guidance_start": 0.8, "control_guidance_end": 0.5}, ["body", "control_guidance_start"]),
        ({"image_size": {"width": 1020, "height": 1024}}, ["body", "image_size", "width"]),
        ({"image_url": "ftp://example.com/pattern.png"}, ["body", "image_url"]),
        ({"image_url": "data:image/png;base64,AAAA"}, ["body", "image_url"]),
    ],
    ids=["missing-image-url", "bad-scheduler", "steps", "guidance", "end", "start-after-end", "size",
         "url-scheme", "undecodable"],
)
def test_schema_errors_are_422_at_the_field(fal_client: ModuleType, change: dict, loc: list) -> None:
    arguments = {k: v for k, v in {**SEED_EXAMPLE, **change}.items() if v is not None}
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=arguments)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert detail[0]["loc"] == loc and detail[0]["msg"] and detail[0]["type"], detail
