"""API keys: storage as digests, the dev key file, and fal's 401 shape on every protected route."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from ember.gateway.app import GatewayApps
from ember.gateway.auth import KeyStore, dev_key_path, ensure_dev_key, hash_key
from ember.gateway.state import GatewayState
from tests.gateway.conftest import (
    API_KEY,
    HTTP_BASE,
    QUEUE_BASE,
    RUN_BASE,
    client,
    down_backend,
    make_settings,
)


def test_key_store_accepts_only_its_keys_in_key_scheme() -> None:
    keys = KeyStore([hash_key("id:secret")])
    assert keys.verify("Key id:secret")
    assert keys.verify("key id:secret")  # scheme is case-insensitive, like HTTP auth schemes
    assert not keys.verify("Key id:other")
    assert not keys.verify("Bearer id:secret")
    assert not keys.verify("id:secret")
    assert not keys.verify("Key ")
    assert not keys.verify(None)


def test_several_keys_from_settings(tmp_path: Path) -> None:
    keys = KeyStore.from_settings(make_settings(tmp_path, EMBER_API_KEY="a:1, b:2"))
    assert keys.verify("Key a:1") and keys.verify("Key b:2")
    assert not keys.verify("Key a:2")
    assert not dev_key_path(make_settings(tmp_path)).exists()  # a configured key means no dev key


def test_dev_key_created_once_private_and_in_fal_form(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, EMBER_API_KEY="")
    keys = KeyStore.from_settings(settings)
    path = dev_key_path(settings)
    key = path.read_text().strip()
    key_id, _, secret = key.partition(":")
    assert len(key_id) == 36 and len(secret) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.verify(f"Key {key}")
    # Reused on the next start, never regenerated.
    assert ensure_dev_key(path) == key
    assert KeyStore.from_settings(settings).verify(f"Key {key}")


def test_key_store_holds_digests_not_keys(tmp_path: Path) -> None:
    keys = KeyStore.from_settings(make_settings(tmp_path, EMBER_API_KEY="the-id:the-secret"))
    assert "the-secret" not in repr(vars(keys))
    assert all(len(d) == 32 for d in keys._digests)


PROTECTED = [
    ("run", "POST", "/fal-ai/lcm"),
    ("queue", "POST", "/fal-ai/lcm"),
    ("queue", "GET", "/fal-ai/lcm/requests/00000000-0000-0000-0000-000000000000/status"),
    ("queue", "GET", "/fal-ai/lcm/requests/00000000-0000-0000-0000-000000000000"),
    ("queue", "PUT", "/fal-ai/lcm/requests/00000000-0000-0000-0000-000000000000/cancel"),
]


@pytest.mark.parametrize("authorization", [None, "Key wrong:key", f"Bearer {API_KEY}"])
@pytest.mark.parametrize(("host", "method", "path"), PROTECTED)
async def test_401_in_fal_shape(
    apps: GatewayApps, host: str, method: str, path: str, authorization: str | None
) -> None:
    app, base = (apps.run, RUN_BASE) if host == "run" else (apps.queue, QUEUE_BASE)
    headers = {"Authorization": authorization} if authorization else {}
    async with client(app, base, auth=False) as c:
        r = await c.request(method, path, json={"prompt": "a cat"} if method == "POST" else None, headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["message"] == body["detail"]
    assert r.headers["x-fal-error-type"] == "unauthorized"
    assert r.headers["x-fal-request-id"]
    assert API_KEY not in r.text


async def test_401_does_not_queue_anything(state: GatewayState, apps: GatewayApps) -> None:
    async with client(apps.queue, QUEUE_BASE, auth=False) as c:
        r = await c.post("/fal-ai/lcm", json={"prompt": "a cat"})
    assert r.status_code == 401
    assert state.jobs.active == {}


@pytest.mark.parametrize("path", ["/health", "/ready"])
async def test_health_and_ready_need_no_key_on_every_listener(apps: GatewayApps, path: str) -> None:
    for app, base in ((apps.run, RUN_BASE), (apps.queue, QUEUE_BASE), (apps.http, HTTP_BASE)):
        async with client(app, base, auth=False) as c:
            r = await c.get(path)
        if path == "/health":
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
        else:
            # The backend here is a Triton that is down: not ready, a 503 with a request id.
            assert r.status_code == 503
            assert r.json()["error_type"] == "runner_scheduling_failure"
        assert r.headers["x-fal-request-id"]


async def test_proxy_without_authorization_is_401_with_cors(http_client: httpx.AsyncClient) -> None:
    r = await http_client.post("/api/fal/proxy", json={"prompt": "a cat"},
                               headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/lcm"})
    assert r.status_code == 401
    assert r.json()["detail"]
    assert r.headers["access-control-allow-origin"] == "*"


async def test_proxy_with_wrong_key_is_401(http_client: httpx.AsyncClient) -> None:
    r = await http_client.post("/api/fal/proxy", json={"prompt": "a cat"},
                               headers={"x-fal-target-url": "https://fal.run/fal-ai/lcm",
                                        "Authorization": "Key nope:nope"})
    assert r.status_code == 401
    assert r.headers["x-fal-error-type"] == "unauthorized"


async def test_dev_key_state_accepts_the_file_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "var", EMBER_API_KEY="")
    state = await GatewayState.open(settings, down_backend(), start_worker=False)
    try:
        key = dev_key_path(settings).read_text().strip()
        assert state.keys.verify(f"Key {key}")
    finally:
        await state.close(1.0)
