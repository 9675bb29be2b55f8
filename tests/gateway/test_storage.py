"""Storage (fal-protocol.md §10): the Python client's CDN path (token, /files/upload, multipart), the
signed-URL path of the JS client and of the Python `fal` fallback (initiate, unauthenticated PUT,
multipart parts + complete), lifecycles, limits, serving, and uploaded files used as inputs."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ember.endpoints import registry
from ember.gateway import tokens
from ember.gateway.app import GatewayApps, build_apps
from ember.gateway.state import GatewayState
from tests.gateway.conftest import AUTH, HTTP_BASE, QUEUE_BASE, FakeBackend, client, make_settings
from tests.gateway.echo_endpoint import EchoEndpoint

REST = "https://127.0.0.1:8446"


def _png(size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[GatewayState, GatewayApps]]:
    settings = make_settings(tmp_path / "var", EMBER_MAX_UPLOAD_BYTES=str(64 * 1024), EMBER_REST_PORT="8446")
    state = await GatewayState.open(settings, FakeBackend())
    try:
        yield state, build_apps(state)
    finally:
        await state.close(1.0)


@pytest.fixture
async def rest(live: tuple[GatewayState, GatewayApps]) -> AsyncIterator[httpx.AsyncClient]:
    async with client(live[1].rest, REST, auth=False) as c:
        yield c


async def _cdn_token(rest: httpx.AsyncClient) -> dict[str, str]:
    r = await rest.post("/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["base_url"] == REST
    expires = dt.datetime.fromisoformat(body["expires_at"])  # what fal_client does with it
    assert expires > dt.datetime.now(dt.UTC)  # aware (an offset), or the client falls back
    return {"Authorization": f"Bearer {body['token']}"}


async def test_cdn_upload_then_served_back(rest: httpx.AsyncClient) -> None:
    bearer = await _cdn_token(rest)
    data = _png()
    r = await rest.post("/files/upload", content=data,
                        headers={**bearer, "content-type": "image/png", "x-fal-file-name": "cat.png"})
    assert r.status_code == 200, r.text
    url = r.json()["access_url"]
    assert url.startswith(f"{REST}/files/") and url.endswith(".png")
    got = await rest.get(url.removeprefix(REST))
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]


@pytest.mark.parametrize("authorization", [None, f"Key {AUTH['Authorization'].split(' ', 1)[1]}", "Bearer nope"])
async def test_cdn_upload_needs_a_cdn_token(rest: httpx.AsyncClient, authorization: str | None) -> None:
    headers = {"content-type": "image/png"} | ({"Authorization": authorization} if authorization else {})
    r = await rest.post("/files/upload", content=b"x", headers=headers)
    assert r.status_code == 401 and r.headers["x-fal-request-id"]


async def test_a_realtime_token_is_not_a_cdn_token(rest: httpx.AsyncClient) -> None:
    r = await rest.post("/tokens/", json={"allowed_apps": ["lcm"], "token_expiration": 120}, headers=AUTH)
    assert r.status_code == 201 and isinstance(r.json(), str)  # a bare JSON string, as fal answers
    r = await rest.post("/files/upload", content=b"x", headers={"Authorization": f"Bearer {r.json()}"})
    assert r.status_code == 401


async def test_cdn_multipart(rest: httpx.AsyncClient) -> None:
    bearer = await _cdn_token(rest)
    r = await rest.post("/files/upload/multipart", headers={**bearer, "content-type": "application/octet-stream",
                                                            "x-fal-file-name": "big.bin"})
    access_url, upload_id = r.json()["access_url"], r.json()["uploadId"]
    path = access_url.removeprefix(REST)
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    parts = []
    for n, chunk in enumerate(chunks, 1):
        r = await rest.put(f"{path}/multipart/{upload_id}/{n}", content=chunk, headers=bearer)
        assert r.status_code == 200 and r.headers["etag"]
        parts.append({"partNumber": n, "etag": r.headers["etag"]})
    bad = await rest.post(f"{path}/multipart/{upload_id}/complete", headers=bearer,
                          json={"parts": [{**parts[0], "etag": "wrong"}]})
    assert bad.status_code == 422
    r = await rest.post(f"{path}/multipart/{upload_id}/complete", headers=bearer, json={"parts": parts[::-1]})
    assert r.status_code == 200 and r.json()["access_url"] == access_url
    assert (await rest.get(path)).content == b"".join(chunks)
    # An upload id works only for its own file.
    other = (await rest.post("/files/upload/multipart", headers=bearer)).json()["access_url"].removeprefix(REST)
    r = await rest.put(f"{other}/multipart/{upload_id}/1", content=b"x", headers=bearer)
    assert r.status_code == 403


async def test_signed_url_upload_needs_no_key(rest: httpx.AsyncClient) -> None:
    for storage_type in ("fal-cdn-v3", "gcs"):
        r = await rest.post("/storage/upload/initiate", params={"storage_type": storage_type}, headers=AUTH,
                            json={"file_name": "mask.png", "content_type": "image/png"})
        upload_url, file_url = r.json()["upload_url"], r.json()["file_url"]
        assert (await rest.get(file_url.removeprefix(REST))).status_code == 404  # not uploaded yet
        r = await rest.put(upload_url.removeprefix(REST), content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        got = await rest.get(file_url.removeprefix(REST))
        assert got.content == _png() and got.headers["content-type"] == "image/png"
    # Not without a key at initiate, and not with a tampered URL.
    assert (await rest.post("/storage/upload/initiate", json={"content_type": "image/png"})).status_code == 401
    token = upload_url.rsplit("/", 1)[1]
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    r = await rest.put(f"/storage/upload/{tampered}", content=b"x")
    assert r.status_code == 403


async def test_signed_url_expires(rest: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    r = await rest.post("/storage/upload/initiate", headers=AUTH, json={"content_type": "text/plain"})
    upload_path = r.json()["upload_url"].removeprefix(REST)
    real_time = tokens.time.time
    monkeypatch.setattr(tokens.time, "time", lambda: real_time() + 3601)  # EMBER_UPLOAD_URL_TTL is 3600
    assert (await rest.put(upload_path, content=b"late")).status_code == 403


async def test_signed_multipart_like_the_js_client(rest: httpx.AsyncClient) -> None:
    r = await rest.post("/storage/upload/initiate-multipart", params={"storage_type": "fal-cdn-v3"}, headers=AUTH,
                        json={"file_name": "clip.bin", "content_type": "application/octet-stream"})
    upload_url, file_url = r.json()["upload_url"], r.json()["file_url"]
    base = upload_url.removeprefix(REST)
    parts = []
    for n, chunk in enumerate([b"x" * 500, b"y" * 7], 1):
        r = await rest.put(f"{base}/{n}", content=chunk)
        assert r.json()["partNumber"] == n
        parts.append(r.json())
    r = await rest.post(f"{base}/complete", json={"parts": parts})
    assert r.status_code == 200
    assert (await rest.get(file_url.removeprefix(REST))).content == b"x" * 500 + b"y" * 7


async def test_preflight_for_browser_uploads(rest: httpx.AsyncClient) -> None:
    r = await rest.options("/storage/upload/sometoken", headers={"Origin": "https://app.example.com",
                                                                 "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 204 and "PUT" in r.headers["access-control-allow-methods"]


async def test_upload_lifecycle_expires_the_file(live: tuple[GatewayState, GatewayApps],
                                                 rest: httpx.AsyncClient) -> None:
    bearer = await _cdn_token(rest)
    lifecycle = json.dumps({"expiration_duration_seconds": 1})
    r = await rest.post("/files/upload", content=b"soon gone", headers={**bearer, "x-fal-object-lifecycle": lifecycle})
    path = r.json()["access_url"].removeprefix(REST)
    assert (await rest.get(path)).status_code == 200
    await asyncio.sleep(1.1)
    assert (await rest.get(path)).status_code == 404
    assert await live[0].files.sweep() == 1
    # The record is gone from the database too (a restart does not bring it back).
    rows = await live[0].db.execute("SELECT count(*) FROM files")
    assert rows[0][0] == 0


async def test_uploads_over_the_limit_are_413(rest: httpx.AsyncClient) -> None:
    bearer = await _cdn_token(rest)
    big = b"z" * (64 * 1024 + 1)
    r = await rest.post("/files/upload", content=big, headers=bearer)
    assert r.status_code == 413

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = await rest.post("/files/upload", content=stream(), headers=bearer)
    assert r.status_code == 413
    assert not [p for p in (rest._transport.app.state.ember.settings.files_dir).iterdir()  # type: ignore[attr-defined]
                if p.is_file()]


async def test_uploaded_html_is_an_attachment(rest: httpx.AsyncClient) -> None:
    bearer = await _cdn_token(rest)
    r = await rest.post("/files/upload", content=b"<script>alert(1)</script>",
                        headers={**bearer, "content-type": "text/html", "x-fal-file-name": "x.html"})
    got = await rest.get(r.json()["access_url"].removeprefix(REST))
    assert got.headers["content-disposition"] == "attachment"
    assert "sandbox" in got.headers["content-security-policy"]


async def test_rest_targets_through_the_js_proxy(live: tuple[GatewayState, GatewayApps]) -> None:
    async with client(live[1].http, HTTP_BASE) as c:
        r = await c.post("/api/fal/proxy", json={"allowed_apps": ["lcm"], "token_expiration": 120},
                         headers={"x-fal-target-url": "https://rest.fal.ai/tokens/"})
        assert r.status_code == 201 and isinstance(r.json(), str)
        assert live[0].signer.verify(r.json(), "realtime")["apps"] == ["lcm"]  # type: ignore[index]
        r = await c.post("/api/fal/proxy", json={"content_type": "image/png", "file_name": "a.png"},
                         headers={"x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate"
                                                      "?storage_type=fal-cdn-v3"})
        assert r.status_code == 200 and r.json()["upload_url"].startswith(f"{REST}/storage/upload/")
        assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(("body", "loc"), [
    ({"allowed_apps": "lcm"}, "allowed_apps"),
    ({"allowed_apps": []}, "allowed_apps"),
    ({"allowed_apps": ["lcm"], "token_expiration": 0}, "token_expiration"),
    ({"allowed_apps": ["lcm"], "token_expiration": 10**9}, "token_expiration"),
])
async def test_token_request_validation(rest: httpx.AsyncClient, body: dict[str, object], loc: str) -> None:
    r = await rest.post("/tokens/", json=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", loc]


async def test_own_file_urls_are_inputs_without_the_public_address_rule(
    live: tuple[GatewayState, GatewayApps], rest: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    echo = EchoEndpoint()
    monkeypatch.setitem(registry.ENDPOINTS, echo.endpoint_id, echo)
    state, apps = live
    bearer = await _cdn_token(rest)
    url = (await rest.post("/files/upload", content=_png((12, 10)), headers={**bearer, "content-type": "image/png"}
                           )).json()["access_url"]
    assert url.startswith("https://127.0.0.1:")  # a loopback address: the fetcher alone would refuse it
    async with client(apps.queue, QUEUE_BASE) as c:
        ok = (await c.post("/ember-test/echo", json={"prompt": "x", "image_url": url, "mask_url": url})).json()
        missing = (await c.post("/ember-test/echo", json={"prompt": "x", "image_url": url[:-8] + "AAAA.png"})).json()
        # The same file through another origin is just a URL: the public-address rule applies.
        other = (await c.post("/ember-test/echo", json={"prompt": "x", "image_url": url.replace("127.0.0.1",
                                                                                            "localhost")})).json()
        for rid in (ok["request_id"], missing["request_id"], other["request_id"]):
            await asyncio.wait_for(state.jobs.wait(state.jobs.active.get(rid) or await state.jobs.get(rid)), 10)
        assert (await c.get(f"/ember-test/echo/requests/{ok['request_id']}")).status_code == 200
        r = await c.get(f"/ember-test/echo/requests/{missing['request_id']}")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_url"]
        r = await c.get(f"/ember-test/echo/requests/{other['request_id']}")
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "url_not_allowed"
    assert echo.loaded[0]["image"].shape == (10, 12, 3) and echo.loaded[0]["mask"].shape == (10, 12)
