"""What a submit asks for besides its input: X-Fal-Request-Timeout (a start deadline: 504 with
x-fal-request-timeout-type: user when it passes before the job starts), X-Fal-Queue-Priority (normal
before low when dispatching), X-Fal-Runner-Hint, X-Fal-Object-Lifecycle-Preference (output files
expire)."""

from __future__ import annotations

import asyncio

import httpx

from ember.gateway.app import build_apps
from ember.gateway.jobs import Status
from ember.gateway.state import GatewayState
from ember.settings import Settings
from tests.gateway.conftest import QUEUE_BASE, RUN_BASE, FakeBackend, client, down_backend

SMALL = {"prompt": "a cat", "image_size": {"width": 64, "height": 48}}


async def _wait(state: GatewayState, rid: str, timeout: float = 10) -> None:
    job = await state.jobs.get(rid)
    assert job is not None
    await asyncio.wait_for(state.jobs.wait(job), timeout)


async def test_start_timeout_expires_a_queued_job_with_504_user(state: GatewayState, apps: object) -> None:
    async with client(build_apps(state).queue, QUEUE_BASE) as c:  # no workers: the job never starts
        r = await c.post("/fal-ai/lcm", json=SMALL, headers={"x-fal-request-timeout": "0.3"})
        rid = r.json()["request_id"]
        assert (await c.get(f"/fal-ai/lcm/requests/{rid}/status")).json()["status"] == "IN_QUEUE"
        await _wait(state, rid)
        status = (await c.get(f"/fal-ai/lcm/requests/{rid}/status")).json()
        assert status["status"] == "COMPLETED" and status["error_type"] == "request_timeout"
        r = await c.get(f"/fal-ai/lcm/requests/{rid}")
        assert r.status_code == 504
        assert r.headers["x-fal-request-timeout-type"] == "user"  # neither client retries this
        assert r.headers["x-fal-request-id"] == rid
        assert len(state.worker.queue) == 0


async def test_start_timeout_does_not_apply_once_started(settings: Settings) -> None:
    state = await GatewayState.open(settings, FakeBackend(step_s=0.1))
    try:
        async with client(build_apps(state).run, RUN_BASE) as c:
            r = await c.post("/fal-ai/lcm", json={**SMALL, "num_inference_steps": 6},
                             headers={"x-fal-request-timeout": "0.2"})  # runs 0.6 s, starts at once
        assert r.status_code == 200, r.text
    finally:
        await state.close(1.0)


async def test_start_deadline_survives_a_restart(settings: Settings) -> None:
    state = await GatewayState.open(settings, down_backend(), start_worker=False)
    async with client(build_apps(state).queue, QUEUE_BASE) as c:
        rid = (await c.post("/fal-ai/lcm", json=SMALL, headers={"x-fal-request-timeout": "0.2"})).json()["request_id"]
    await state.jobs.close()  # a crash: no drain
    await state.db.close()
    await asyncio.sleep(0.3)
    state = await GatewayState.open(settings, down_backend(), start_worker=False)
    try:
        await _wait(state, rid)
        job = await state.jobs.get(rid)
        assert job is not None and job.error is not None and job.error.timeout_type == "user"
    finally:
        await state.close(1.0)


async def test_low_priority_waits_for_normal_when_dispatching(settings: Settings) -> None:
    settings = type(settings)(**{**settings.__dict__, "worker_concurrency": 1})
    backend = FakeBackend(step_s=0.02)
    state = await GatewayState.open(settings, backend, start_worker=False)
    try:
        async with client(build_apps(state).queue, QUEUE_BASE) as c:
            order = []
            for i, priority in enumerate(["low", "normal", "low", "normal"]):
                r = await c.post("/fal-ai/lcm", json={**SMALL, "seed": i, "num_inference_steps": 1},
                                 headers={"x-fal-queue-priority": priority, "x-fal-runner-hint": "gpu-a"})
                order.append(r.json()["request_id"])
        state.worker.start()
        for rid in order:
            await _wait(state, rid)
        seeds = [int(t["SEED"].reshape(-1)[0]) for t in backend.requests]
        assert seeds == [1, 3, 0, 2]
        assert (await state.jobs.get(order[0])).runner_hint == "gpu-a"  # type: ignore[union-attr]
    finally:
        await state.close(1.0)


async def test_lifecycle_preference_expires_output_files(settings: Settings) -> None:
    state = await GatewayState.open(settings, FakeBackend())
    try:
        apps = build_apps(state)
        async with client(apps.run, RUN_BASE) as c:
            r = await c.post("/fal-ai/lcm", json=SMALL,
                             headers={"x-fal-object-lifecycle-preference": '{"expiration_duration_seconds": 1}'})
            kept = await c.post("/fal-ai/lcm", json=SMALL)
            path = r.json()["images"][0]["url"].removeprefix(state.run_base)
            kept_path = kept.json()["images"][0]["url"].removeprefix(state.run_base)
            first = await c.get(path)
            assert first.status_code == 200 and first.headers["cache-control"].startswith("private, max-age=")
            await asyncio.sleep(1.1)
            assert (await c.get(path)).status_code == 404  # expired: 404 at once
            assert await state.files.sweep() == 1  # and deleted by the sweeper
            assert not (state.settings.files_dir / path.rsplit("/", 1)[1]).exists()
            assert (await c.get(kept_path)).status_code == 200
            bad = await c.post("/fal-ai/lcm", json=SMALL, headers={"x-fal-object-lifecycle-preference": "soon"})
            assert bad.status_code == 422
            assert bad.json()["detail"][0]["loc"] == ["header", "x-fal-object-lifecycle-preference"]
    finally:
        await state.close(1.0)


async def test_webhook_to_a_private_address_is_refused_at_submit(queue_client: httpx.AsyncClient) -> None:
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://[::1]/x", "http://10.0.0.1/"):
        r = await queue_client.post("/fal-ai/lcm", params={"fal_webhook": url}, json=SMALL)
        assert r.status_code == 422, url
        assert r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    # A host that does not resolve yet is accepted: delivery resolves again, and retries.
    r = await queue_client.post("/fal-ai/lcm", params={"fal_webhook": "https://hooks.example.invalid/x"}, json=SMALL)
    assert r.status_code == 200


async def test_job_reaches_completed_once(state: GatewayState) -> None:
    async with client(build_apps(state).queue, QUEUE_BASE) as c:
        rid = (await c.post("/fal-ai/lcm", json=SMALL)).json()["request_id"]
    job = state.jobs.active[rid]
    assert await state.jobs.finish(job, result='{"a": 1}') is True
    assert await state.jobs.finish(job, result='{"a": 2}') is False
    # Even a second writer with its own copy of the job cannot overwrite the stored result.
    copy = type(job)(**{**job.__dict__, "status": Status.IN_PROGRESS})
    assert await state.jobs.finish(copy, result='{"a": 3}') is False
    rows = await state.jobs._db("SELECT result FROM jobs WHERE id = ?", (rid,))
    assert rows[0]["result"] == '{"a": 1}' and copy.result == '{"a": 1}'
