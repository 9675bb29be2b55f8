"""The hostile-input suite, table-driven: every URL field (image, mask, weights) through the one
MediaLoader path an endpoint's translate code calls (tests/gateway/echo_endpoint.py), end to end
through the queue: each case must be a 422 whose `loc` names the field, never a 500, and must leave
the gateway serving. Plus the safetensors check on its own, against files the `safetensors` library
writes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
import struct
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ember.endpoints import registry
from ember.endpoints.common import InputError
from ember.gateway.app import GatewayApps, build_apps
from ember.gateway.state import GatewayState
from ember.gateway.weights import ONLY_SAFETENSORS, check_safetensors
from tests.gateway.conftest import QUEUE_BASE, FakeBackend, client, make_settings
from tests.gateway.echo_endpoint import EchoEndpoint

MAX_BYTES = 300_000


def _encoded(fmt: str = "PNG", size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, fmt)
    return buf.getvalue()


def _data(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def _raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"weight": [1, 2, 3]}))
    return buf.getvalue()


GOOD_LORA = _safetensors({"lora_up.weight": np.ones((4, 2), np.float16), "lora_down.weight": np.zeros((2, 4), np.float32)})

ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/ok.png": (200, {"Content-Type": "image/png"}, _encoded()),
    "/big.png": (200, {"Content-Type": "image/png"}, b"\x89PNG" + b"0" * (MAX_BYTES + 1)),
    "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/iam"}, b""),
    "/to-private": (302, {"Location": "http://10.0.0.7/x.png"}, b""),
    "/missing": (404, {}, b""),
    "/lora.safetensors": (200, {}, GOOD_LORA),
    "/model.ckpt": (200, {}, _zip()),
}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = ROUTES.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
async def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[GatewayState, GatewayApps,
                                                                                       EchoEndpoint]]:
    echo = EchoEndpoint()
    monkeypatch.setitem(registry.ENDPOINTS, echo.endpoint_id, echo)
    settings = make_settings(tmp_path / "var", EMBER_FETCH_ALLOW="127.0.0.1/32", EMBER_FETCH_MAX_BYTES=str(MAX_BYTES),
                             EMBER_WEIGHTS_MAX_BYTES=str(MAX_BYTES), EMBER_MAX_BODY_BYTES=str(4 * MAX_BYTES))
    state = await GatewayState.open(settings, FakeBackend())
    try:
        yield state, build_apps(state), echo
    finally:
        await state.close(1.0)


# (case, field, value or "{server}/path", expected `type`, refused at submit (True) or when the job runs)
HOSTILE: list[tuple[str, str, str, str, bool]] = [
    ("file scheme", "image_url", "file:///etc/passwd", "url_not_allowed", True),
    ("ftp scheme", "image_url", "ftp://example.com/a.png", "url_not_allowed", True),
    ("gopher to redis", "mask_url", "gopher://127.0.0.1:6379/_FLUSHALL", "url_not_allowed", True),
    ("no host", "image_url", "http:///a.png", "url_not_allowed", True),
    ("data URI without comma", "image_url", "data:image/png;base64", "invalid_data_uri", True),
    ("cloud metadata", "image_url", "http://169.254.169.254/latest/meta-data/", "url_not_allowed", False),
    ("private network", "mask_url", "http://10.1.2.3/mask.png", "url_not_allowed", False),
    ("loopback outside the allow-list", "image_url", "http://127.0.0.2:1/a.png", "url_not_allowed", False),
    ("decimal loopback", "image_url", "http://2130706434:1/a.png", "url_not_allowed", False),
    ("IPv4-mapped loopback", "image_url", "http://[::ffff:127.0.0.2]:1/a.png", "url_not_allowed", False),
    ("redirect to metadata", "image_url", "{server}/to-metadata", "url_not_allowed", False),
    ("redirect to private", "image_url", "{server}/to-private", "url_not_allowed", False),
    ("over the byte cap", "image_url", "{server}/big.png", "file_too_large", False),
    ("404", "image_url", "{server}/missing", "url_fetch_error", False),
    ("not an image", "image_url", _data(b"hello, I am text", "text/plain"), "invalid_image", False),
    ("truncated PNG", "mask_url", _data(_encoded()[:50]), "invalid_image", False),
    ("TIFF is not accepted", "image_url", _data(_encoded("TIFF"), "image/tiff"), "invalid_image", False),
    ("decompression bomb", "image_url", _data(_encoded("PNG", (4097, 4097))), "image_too_large", False),
    ("data URI over the cap", "image_url", _data(b"\x89PNG" + b"0" * MAX_BYTES), "file_too_large", False),
    ("pickle as weights", "lora_url", _data(pickle.dumps({"w": 1}), "application/octet-stream"),
     "invalid_weights", False),
    ("torch zip as weights", "lora_url", "{server}/model.ckpt", "invalid_weights", False),
    ("random bytes as weights", "lora_url", _data(b"\x00" * 64, "application/octet-stream"), "invalid_weights", False),
    ("image as weights", "lora_url", "{server}/ok.png", "invalid_weights", False),
]


@pytest.mark.parametrize(("case", "field", "value", "type_", "at_submit"), HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_url_inputs_are_422_at_the_field(
    live: tuple[GatewayState, GatewayApps, EchoEndpoint], server: str, case: str, field: str, value: str,
    type_: str, at_submit: bool,
) -> None:
    state, apps, _ = live
    payload = {"prompt": "x", field: value.format(server=server)}
    async with client(apps.queue, QUEUE_BASE) as c:
        r = await c.post("/ember-test/echo", json=payload)
        if at_submit:
            assert r.status_code == 422, r.text
            body = r.json()
        else:
            assert r.status_code == 200, r.text
            rid = r.json()["request_id"]
            job = state.jobs.active.get(rid) or await state.jobs.get(rid)
            await asyncio.wait_for(state.jobs.wait(job), 20)  # type: ignore[arg-type]
            r = await c.get(f"/ember-test/echo/requests/{rid}")
            assert r.status_code == 422, r.text
            body = r.json()
    detail = body["detail"][0]
    assert detail["loc"] == ["body", field]
    assert detail["type"] == type_, detail
    if type_ == "invalid_weights":
        assert ONLY_SAFETENSORS in detail["msg"]
    # Nothing secret or huge is echoed back: no data URI payloads, no query strings.
    assert len(json.dumps(body)) < 2000


async def test_good_inputs_load(live: tuple[GatewayState, GatewayApps, EchoEndpoint], server: str) -> None:
    state, apps, echo = live
    async with client(apps.queue, QUEUE_BASE) as c:
        r = await c.post("/ember-test/echo", json={"prompt": "x", "image_url": f"{server}/ok.png",
                                                   "mask_url": _data(_encoded("JPEG")),
                                                   "lora_url": f"{server}/lora.safetensors"})
        rid = r.json()["request_id"]
        await asyncio.wait_for(state.jobs.wait(state.jobs.active[rid]), 10)
        assert (await c.get(f"/ember-test/echo/requests/{rid}")).status_code == 200
    loaded = echo.loaded[-1]
    assert loaded["image"].shape == (16, 16, 3) and loaded["mask"].shape == (16, 16)
    assert set(loaded["lora"].tensors) == {"lora_up.weight", "lora_down.weight"}
    assert loaded["lora"].tensors["lora_up.weight"].dtype == "F16"


# -- the safetensors check on its own --------------------------------------------------------------

LOC = ("body", "loras", 0, "path")
_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD_WEIGHTS: list[tuple[str, bytes, str]] = [
    ("pickle protocol 2", pickle.dumps([1], protocol=2), "pickle"),
    ("pickle protocol 5", pickle.dumps([1], protocol=5), "pickle"),
    ("zip (torch.save)", _zip(), "zip"),
    ("gguf", b"GGUF" + b"\x00" * 40, "GGUF"),
    ("too short", b"\x01\x02", "too short"),
    ("header length past the end", struct.pack("<Q", 10**6) + b"{}", "header length"),
    ("header length absurd", struct.pack("<Q", 2**62) + b"{}", "header length"),
    ("header not JSON", struct.pack("<Q", 4) + b"\xff\xfe\x00\x01", "not JSON"),
    ("header a list", _raw_safetensors([], b""), "not a JSON object"),  # type: ignore[arg-type]
    ("unknown dtype", _raw_safetensors({"w": {**_F32, "dtype": "F128"}}, b"\x00" * 8), "dtype"),
    ("negative shape", _raw_safetensors({"w": {**_F32, "shape": [-2]}}, b"\x00" * 8), "shape"),
    ("offsets outside", _raw_safetensors({"w": {**_F32, "data_offsets": [0, 800]}}, b"\x00" * 8), "outside"),
    ("size mismatch", _raw_safetensors({"w": {**_F32, "shape": [3]}}, b"\x00" * 8), "do not hold"),
    ("overlap", _raw_safetensors({"a": _F32, "b": _F32}, b"\x00" * 8), "overlap"),
    ("trailing bytes", _raw_safetensors({"w": _F32}, b"\x00" * 12), "data section"),
    ("bad metadata", _raw_safetensors({"__metadata__": {"k": 1}, "w": _F32}, b"\x00" * 8), "__metadata__"),
]


@pytest.mark.parametrize(("case", "data", "why"), BAD_WEIGHTS, ids=[c[0] for c in BAD_WEIGHTS])
def test_safetensors_check_refuses(case: str, data: bytes, why: str) -> None:
    with pytest.raises(InputError) as info:
        check_safetensors(data, LOC)
    assert info.value.loc == LOC and info.value.type == "invalid_weights"
    assert info.value.msg.startswith(ONLY_SAFETENSORS) and why in info.value.msg


def test_safetensors_check_accepts_real_files() -> None:
    data = _safetensors({"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.zeros((0,), np.float32),
                         "c": np.ones((1, 2, 3, 4), np.float16)})
    checked = check_safetensors(data, LOC)
    assert checked.tensors["a"].shape == (2, 3) and checked.tensors["a"].dtype == "I64"
    assert checked.tensors["b"].shape == (0,)
    with pytest.raises(InputError) as info:
        check_safetensors(data, LOC, max_bytes=len(data) - 1)
    assert info.value.type == "file_too_large"
