"""Routes without a key on every listener: /metrics (Prometheus), /openapi.json with every endpoint's
exact schema, /docs, /.well-known/jwks.json, and /ready dropping first on shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ember.endpoints.registry import ENDPOINTS
from ember.gateway.app import GatewayApps, build_apps
from ember.gateway.state import GatewayState
from tests.gateway.conftest import HTTP_BASE, QUEUE_BASE, RUN_BASE, FakeBackend, client, make_settings

REST_BASE = "https://127.0.0.1:8446"


def _all(apps: GatewayApps) -> list[tuple[object, str]]:
    return [(apps.run, RUN_BASE), (apps.queue, QUEUE_BASE), (apps.rest, REST_BASE), (apps.http, HTTP_BASE)]


async def test_metrics_cover_queue_latency_retries_and_webhooks(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "var")
    state = await GatewayState.open(settings, FakeBackend(), max_attempts=2, retry_delay=0.01)
    try:
        apps = build_apps(state)
        async with client(apps.run, RUN_BASE) as c:
            assert (await c.post("/fal-ai/lcm", json={"prompt": "a", "image_size": {"width": 64, "height": 64}})
                    ).status_code == 200
            assert (await c.post("/fal-ai/lcm", json={"prompt": "fail unavailable"})).status_code == 503
        async with client(apps.http, HTTP_BASE, auth=False) as c:
            r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
        for name in ("ember_queue_depth", "ember_jobs_running", "ember_queue_wait_seconds",
                     "ember_job_duration_seconds", "ember_job_retries", "ember_http_request_duration_seconds",
                     "ember_webhook_deliveries", "ember_realtime_sessions"):
            assert name in families, name
        ok = (("endpoint", "fal-ai/lcm"), ("mode", "run"), ("status", "200"))
        assert samples[("ember_job_duration_seconds_count", ok)] == 1
        assert samples[("ember_job_duration_seconds_count", (*ok[:2], ("status", "503")))] == 1
        assert samples[("ember_job_retries_total", (("endpoint", "fal-ai/lcm"), ("reason", "backend_unavailable")))] == 1
        assert samples[("ember_queue_depth", (("priority", "normal"),))] == 0
        assert any(k[0] == "ember_http_request_duration_seconds_count" and ("listener", "run") in k[1]
                   for k in samples)
    finally:
        await state.close(1.0)


async def test_openapi_has_each_endpoints_exact_schemas(apps: GatewayApps) -> None:
    async with client(apps.run, RUN_BASE, auth=False) as c:
        run_doc = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    async with client(apps.queue, QUEUE_BASE, auth=False) as c:
        queue_doc = (await c.get("/openapi.json")).json()
    async with client(apps.rest, REST_BASE, auth=False) as c:
        rest_doc = (await c.get("/openapi.json")).json()
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text
    for endpoint in ENDPOINTS.values():
        eid = endpoint.endpoint_id
        schemas = run_doc["components"]["schemas"]
        assert schemas[endpoint.input_model.__name__]["properties"].keys() == \
            endpoint.input_model.model_json_schema()["properties"].keys()
        run = run_doc["paths"][f"/{eid}"]["post"]
        assert run["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            endpoint.input_model.__name__)
        assert run["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            endpoint.output_model.__name__)
        assert f"/{eid}/stream" in run_doc["paths"] and f"/{eid}/realtime" in run_doc["paths"]
        assert f"/{eid}" in queue_doc["paths"] and "/fal-ai/lcm/requests/{request_id}/status" in queue_doc["paths"]
    assert run_doc["components"]["schemas"]["LcmInput"]["title"] == "LCMInput"  # fal's name
    lcm = run_doc["components"]["schemas"]["LcmInput"]["properties"]
    assert lcm["num_inference_steps"]["maximum"] == 12 and lcm["prompt"]["type"] == "string"
    assert "/tokens/" in rest_doc["paths"] and "/.well-known/jwks.json" in rest_doc["paths"]
    assert run_doc["servers"][0]["url"] == RUN_BASE


async def test_every_listener_answers_the_ops_routes_without_a_key(apps: GatewayApps) -> None:
    for app, base in _all(apps):
        async with client(app, base, auth=False) as c:
            for path in ("/health", "/metrics", "/.well-known/jwks.json", "/openapi.json"):
                r = await c.get(path)
                assert r.status_code == 200, (base, path)
                assert r.headers["x-fal-request-id"]
            jwk = (await c.get("/.well-known/jwks.json")).json()["keys"][0]
            assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")


async def test_readiness_drops_first_on_shutdown(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "var")
    backend = FakeBackend(step_s=0.1)
    state = await GatewayState.open(settings, backend)
    apps = build_apps(state)
    async with client(apps.run, RUN_BASE) as c, client(apps.queue, QUEUE_BASE) as q:
        assert (await c.get("/ready")).status_code == 200
        rid = (await q.post("/fal-ai/lcm", json={"prompt": "a", "num_inference_steps": 5})).json()["request_id"]
        for _ in range(200):  # shut down only once the job runs: a queued one would (rightly) stay queued
            if (await q.get(f"/fal-ai/lcm/requests/{rid}/status")).json()["status"] == "IN_PROGRESS":
                break
            await asyncio.sleep(0.01)
        closing = asyncio.create_task(state.close(drain_timeout=5.0))
        await asyncio.sleep(0.05)
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["error_type"] == "runner_disconnected"
        assert (await c.get("/health")).status_code == 200
        # Draining: the running job finishes (its status is still answered), no new one starts.
        status = await q.get(f"/fal-ai/lcm/requests/{rid}/status")
        assert status.status_code in (200, 202)
        await closing
    job = await _reopened_job(settings, rid)
    assert job is not None and job.error is None and job.attempts == 1


async def _reopened_job(settings: object, rid: str) -> object:
    state = await GatewayState.open(settings, FakeBackend(), start_worker=False)  # type: ignore[arg-type]
    try:
        return await state.jobs.get(rid)
    finally:
        await state.close(1.0)


async def test_unknown_rest_path_is_404_json(apps: GatewayApps) -> None:
    async with client(apps.rest, REST_BASE) as c:
        r = await c.post("/storage/upload/complete-multipart")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"


async def test_http_listener_serves_files_and_ops(apps: GatewayApps, state: GatewayState) -> None:
    import numpy as np

    stored = await state.files.save(np.zeros((4, 4, 3), np.uint8), "png")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(apps.http), base_url=HTTP_BASE) as c:  # type: ignore[arg-type]
        assert (await c.get(f"/files/{stored.file_name}")).status_code == 200
