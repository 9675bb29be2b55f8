"""Output images: encoded, stored and served by URL, or inlined as data URIs (sync_mode)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from ember.gateway.app import GatewayApps
from ember.gateway.files import encode_image
from ember.gateway.state import GatewayState
from tests.gateway.conftest import HTTP_BASE, RUN_BASE, client


def _image(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("fmt", "content_type", "pil_format"), [("jpeg", "image/jpeg", "JPEG"),
                                                                 ("png", "image/png", "PNG")])
async def test_stored_file_is_served_on_run_and_http_listeners(
    state: GatewayState, apps: GatewayApps, fmt: str, content_type: str, pil_format: str
) -> None:
    image = _image()
    stored = await state.files.save(image, fmt)
    assert (stored.width, stored.height, stored.content_type) == (64, 48, content_type)
    assert stored.url == f"https://127.0.0.1:{state.settings.run_port}/files/{stored.file_name}"
    assert (state.settings.files_dir / stored.file_name).stat().st_size == stored.file_size
    for app, base in ((apps.run, RUN_BASE), (apps.http, HTTP_BASE)):
        async with client(app, base, auth=False) as c:  # file URLs need no key, like fal's CDN
            r = await c.get(f"/files/{stored.file_name}")
        assert r.status_code == 200
        assert r.headers["content-type"] == content_type
        decoded = Image.open(io.BytesIO(r.content))
        assert decoded.format == pil_format and decoded.size == (64, 48)
        if fmt == "png":  # lossless
            assert np.array_equal(np.asarray(decoded), image)


async def test_sync_mode_inlines_a_data_uri(state: GatewayState) -> None:
    image = _image()
    stored = await state.files.sink(sync_mode=True)(image, "jpeg")
    prefix = "data:image/jpeg;base64,"
    assert stored.url.startswith(prefix)
    data = base64.b64decode(stored.url[len(prefix):])
    assert len(data) == stored.file_size
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    assert list(state.settings.files_dir.iterdir()) == []  # nothing written to disk


def test_jpeg_is_quality_95() -> None:
    # A smooth gradient survives JPEG at 95 nearly untouched, and 95 is larger than PIL's default 75.
    y, x = np.mgrid[0:64, 0:64]
    image = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    encoded = encode_image(image, "jpeg")
    decoded = np.asarray(Image.open(io.BytesIO(encoded.data))).astype(int)
    assert np.abs(decoded - image).mean() < 1.5
    default = io.BytesIO()
    Image.fromarray(image).save(default, format="JPEG")
    assert len(encoded.data) > len(default.getvalue())


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 4), np.uint8)])
def test_encode_refuses_what_is_not_an_rgb_uint8_image(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_image(bad, "png")


@pytest.mark.parametrize("name", ["nope.png", "..%2F..%2Fjobs.sqlite3", "%2E%2E", "x" * 40 + ".gif",
                                  ".hidden-name-123.png.tmp"])
async def test_unknown_or_unsafe_file_names_are_404(run_client: httpx.AsyncClient, name: str) -> None:
    r = await run_client.get(f"/files/{name}")
    # 404, or 405 where the decoded path leaves /files/ and lands on the POST-only run route.
    assert r.status_code in (404, 405)
    assert r.headers["content-type"] == "application/json"
