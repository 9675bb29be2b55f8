"""`/api/fal/proxy` on the http listener: the JS client's proxyUrl (fal-protocol.md §11)."""

from __future__ import annotations

import httpx
import pytest

from ember.gateway.proxy import OFFICIAL_TARGETS, allowed_target
from tests.gateway.conftest import AUTH, QUEUE_BASE

TARGET = "x-fal-target-url"


@pytest.mark.parametrize(("url", "ok"), [
    ("https://fal.run/fal-ai/lcm", True),
    ("https://fal.run/fal-ai/lcm/stream?x=1", True),
    ("https://queue.fal.run/fal-ai/lcm/requests/abc/status?logs=1", True),
    ("https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3", True),
    ("https://rest.fal.ai/storage/upload/complete-multipart?storage_type=fal-cdn-v3", True),
    # Refused by the official server-proxy's default, allowed here (realtime tokens, big uploads).
    ("https://rest.fal.ai/tokens/", True),
    ("https://rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3", True),
    # Refused by both.
    ("https://rest.fal.ai/storage/upload/initiate?storage_type=gcs", False),
    ("https://rest.fal.ai/tokens/extra", False),
    ("https://rest.fal.ai/storage/auth/token?storage_type=fal-cdn-v3", False),
    ("https://evil.example.com/fal-ai/lcm", False),
    ("https://fal.run.evil.example.com/fal-ai/lcm", False),
    ("https://evilfal.run/fal-ai/lcm", False),
    ("https://user:pw@fal.run/fal-ai/lcm", False),
    ("https://fal.run:8443/fal-ai/lcm", False),
    ("file:///etc/passwd", False),
    ("not a url", False),
])
def test_allow_list(url: str, ok: bool) -> None:
    assert (allowed_target(url) is not None) == ok


def test_official_default_allow_list_is_kept_verbatim() -> None:
    # @fal-ai/server-proxy 1.2.1 src/config.js; ours is this plus EXTRA_TARGETS (documented in the README).
    assert OFFICIAL_TARGETS == ("fal.run/**", "queue.fal.run/**",
                                "rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
                                "rest.fal.ai/storage/upload/complete-multipart?storage_type=fal-cdn-v3")


async def test_preflight_answers_cors_without_auth(http_client: httpx.AsyncClient) -> None:
    r = await http_client.options("/api/fal/proxy", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-fal-target-url"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "accept", "x-fal-target-url", "x-fal-queue-priority",
            "x-fal-runner-hint", "x-fal-request-timeout", "x-fal-object-lifecycle-preference",
            "x-fal-object-lifecycle"} <= allowed
    assert {"GET", "POST", "PUT"} <= {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}


async def test_missing_target_is_400(http_client: httpx.AsyncClient) -> None:
    r = await http_client.post("/api/fal/proxy", json={"prompt": "a cat"}, headers=AUTH)
    assert r.status_code == 400
    assert "Invalid request" in r.json()["detail"]
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("target", ["https://rest.fal.ai/storage/upload/initiate?storage_type=gcs",
                                    "https://example.com/fal-ai/lcm"])
async def test_target_outside_allow_list_is_400(http_client: httpx.AsyncClient, target: str) -> None:
    r = await http_client.post("/api/fal/proxy", json={}, headers={**AUTH, TARGET: target})
    assert r.status_code == 400
    assert r.headers["x-fal-request-id"]


async def test_allowed_but_unserved_storage_target_is_404(http_client: httpx.AsyncClient) -> None:
    # The JS client completes multipart uploads at the signed upload URL, never here.
    r = await http_client.post("/api/fal/proxy", json={"parts": []},
                               headers={**AUTH, TARGET: "https://rest.fal.ai/storage/upload/complete-multipart"
                                                        "?storage_type=fal-cdn-v3"})
    assert r.status_code == 404
    assert r.headers["access-control-allow-origin"] == "*"


async def test_queue_round_trip_through_the_proxy(http_client: httpx.AsyncClient) -> None:
    # What @fal-ai/client sends for queue.submit / status / cancel / result (JS builds these URLs).
    headers = {**AUTH, "content-type": "application/json", "x-fal-queue-priority": "normal"}
    r = await http_client.post("/api/fal/proxy", json={"prompt": "a cat"},
                               headers={**headers, TARGET: "https://queue.fal.run/fal-ai/lcm"})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    assert r.headers["x-fal-request-id"] == rid
    assert r.headers["access-control-allow-origin"] == "*"
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-fal-request-id", "x-fal-error-type", "x-fal-request-timeout-type"} <= exposed
    # URLs handed out are still the queue host's (JS ignores them; PY uses them).
    assert r.json()["status_url"].startswith(QUEUE_BASE)

    app_url = f"https://queue.fal.run/fal-ai/lcm/requests/{rid}"
    r = await http_client.get("/api/fal/proxy", headers={**headers, TARGET: f"{app_url}/status?logs=1"})
    assert (r.status_code, r.json()["status"]) == (202, "IN_QUEUE")
    r = await http_client.put("/api/fal/proxy", headers={**headers, TARGET: f"{app_url}/cancel",
                                                         "content-length": "0"})
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    r = await http_client.get("/api/fal/proxy", headers={**headers, TARGET: app_url})
    assert r.status_code == 400 and r.json()["error_type"] == "request_cancelled"
    assert r.headers["x-fal-request-id"] == rid


async def test_run_target_validates_like_the_run_host(http_client: httpx.AsyncClient) -> None:
    r = await http_client.post("/api/fal/proxy", json={"prompt": "a cat", "num_inference_steps": 99},
                               headers={**AUTH, TARGET: "https://fal.run/fal-ai/lcm"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "num_inference_steps"]
    assert r.headers["access-control-allow-origin"] == "*"


async def test_unknown_endpoint_through_the_proxy_is_404(http_client: httpx.AsyncClient) -> None:
    r = await http_client.post("/api/fal/proxy", json={"prompt": "a cat"},
                               headers={**AUTH, TARGET: "https://fal.run/fal-ai/flux/dev"})
    assert r.status_code == 404


async def test_other_methods_are_405(http_client: httpx.AsyncClient) -> None:
    r = await http_client.delete("/api/fal/proxy", headers={**AUTH, TARGET: "https://fal.run/fal-ai/lcm"})
    assert r.status_code == 405
