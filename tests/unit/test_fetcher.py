"""The SSRF-safe fetcher and the image decoder against hostile inputs, table-driven, over real
sockets on 127.0.0.1 (the only addresses a test may touch)."""

from __future__ import annotations

import base64
import io
import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from ember.gateway.fetcher import Fetcher, FetchError, FetchPolicy, is_public, parse_data_uri
from ember.gateway.media import ImageInputError, decode_image


def _png(w: int = 8, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 30)).save(buf, "PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b"nope"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.seen_hosts.append(self.headers.get("Host"))  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.seen_hosts = []  # type: ignore[attr-defined]
    port = httpd.server_address[1]
    _Handler.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, _png()),
        "/big": (200, {}, b"x" * 5000),
        "/redirect-local": (302, {"Location": "/ok.png"}, b""),
        "/redirect-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/missing": (404, {}, b""),
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("224.0.0.1", False), ("0.0.0.0", False),
        ("::1", False), ("fe80::1", False), ("fd00:ec2::254", False), ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False), ("64:ff9b::a9fe:a9fe", False), ("240.0.0.1", False),
    ],
)
def test_public_address_rule(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    "url, kind",
    [
        ("file:///etc/passwd", "url_not_allowed"),
        ("ftp://example.com/x", "url_not_allowed"),
        ("gopher://127.0.0.1:6379/_INFO", "url_not_allowed"),
        ("http://127.0.0.1:1/x", "url_not_allowed"),
        ("http://localhost:1/x", "url_not_allowed"),
        ("http://[::1]:1/x", "url_not_allowed"),
        ("http://[::ffff:7f00:1]:1/x", "url_not_allowed"),
        ("http://169.254.169.254/latest/meta-data/", "url_not_allowed"),
        ("http://2130706433/", "url_not_allowed"),  # 127.0.0.1 as a decimal integer
        ("http://user:pw@example.com/x", "url_not_allowed"),
        ("data:image/png;base64", "invalid_data_uri"),
    ],
)
async def test_hostile_urls_are_refused(url: str, kind: str) -> None:
    fetcher = Fetcher(FetchPolicy())
    try:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch(url)
        assert info.value.kind == kind
    finally:
        await fetcher.close()


async def test_allow_list_fetch_redirects_and_limits(server: str) -> None:
    fetcher = Fetcher(FetchPolicy(allow=("127.0.0.1/32",), max_bytes=1000, max_redirects=3))
    try:
        fetched = await fetcher.fetch(f"{server}/ok.png")
        assert fetched.content_type == "image/png" and decode_image(fetched.data).shape == (8, 8, 3)
        assert (await fetcher.fetch(f"{server}/redirect-local")).url.endswith("/ok.png")
        cases = {"/redirect-metadata": "url_not_allowed", "/big": "file_too_large",
                 "/loop": "url_fetch_error", "/missing": "url_fetch_error"}
        for path, kind in cases.items():
            with pytest.raises(FetchError) as info:
                await fetcher.fetch(server + path)
            assert info.value.kind == kind, path
    finally:
        await fetcher.close()


async def test_connects_to_the_checked_address_with_the_original_host_header(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    fetcher = Fetcher(FetchPolicy(allow=("localhost",)))
    try:
        fetched = await fetcher.fetch(f"http://localhost:{port}/ok.png")
        assert fetched.data == _png()
    finally:
        await fetcher.close()


def test_data_uris() -> None:
    png = _png()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    fetched = parse_data_uri(uri, 10_000)
    assert fetched.data == png and fetched.content_type == "image/png"
    with pytest.raises(FetchError) as info:
        parse_data_uri(uri, 10)
    assert info.value.kind == "file_too_large"


def _encoded(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"not an image at all", "invalid_image"),
        (_png()[:40], "invalid_image"),  # truncated
        (_encoded("TIFF"), "invalid_image"),  # a format fal does not take
        (_encoded("PNG", (4097, 4097)), "image_too_large"),  # pixel cap before decoding
    ],
)
def test_hostile_images(data: bytes, kind: str) -> None:
    with pytest.raises(ImageInputError) as info:
        decode_image(data)
    assert info.value.kind == kind


def test_good_images_decode_in_every_accepted_format() -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        array = decode_image(_encoded(fmt))
        assert array.shape == (16, 16, 3) and array.dtype == np.uint8
