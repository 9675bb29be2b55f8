"""Jobs survive the process: what was accepted is re-queued or re-run after a restart (same SQLite
file), and a backend that is down is retried a bounded number of times, then answered 503."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ember.gateway.app import build_apps
from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.jobs import Job, JobStore, Status
from ember.gateway.state import GatewayState
from ember.settings import Settings
from tests.gateway.conftest import QUEUE_BASE, RUN_BASE, client, down_backend


async def _open(settings: Settings, start_worker: bool = False, **kw: float) -> GatewayState:
    return await GatewayState.open(settings, down_backend(), start_worker=start_worker, **kw)  # type: ignore[arg-type]


async def _crash(state: GatewayState) -> None:
    """Stop as a killed process would: nothing drained or re-queued, only handles released."""
    await state.jobs.close()
    state.files.close()
    await state.backend.close()


async def _submit(state: GatewayState, n: int, priority: str = "normal") -> list[str]:
    ids = []
    async with client(build_apps(state).queue, QUEUE_BASE) as c:
        for i in range(n):
            r = await c.post("/fal-ai/lcm", json={"prompt": f"cat {i}", "seed": i},
                             headers={"x-fal-queue-priority": priority})
            assert r.status_code == 200
            ids.append(r.json()["request_id"])
    return ids


async def test_store_round_trips_every_field(tmp_path: Path) -> None:
    store = await JobStore.open(tmp_path / "jobs.sqlite3")
    job = Job(id="j1", endpoint_id="fal-ai/lcm", subpath="", mode="queue", input={"prompt": "é"}, seed=2**40,
              priority="low", webhook_url="https://example.com/h", start_timeout=12.5, runner_hint="h")
    await store.add(job)
    await store.start(job)
    store.log(job, "step 1/2")
    await store.finish(job, error=ApiError.validation([{"loc": ["body"], "msg": "m", "type": "t"}]))
    await store.close()

    store = await JobStore.open(tmp_path / "jobs.sqlite3")
    again = await store.get("j1")
    await store.close()
    assert again is not None
    for name in ("id", "endpoint_id", "subpath", "mode", "input", "seed", "priority", "webhook_url",
                 "start_timeout", "runner_hint", "status", "attempts", "created_at", "started_at",
                 "finished_at", "inference_time", "logs", "result"):
        assert getattr(again, name) == getattr(job, name), name
    assert again.error is not None and again.error.to_record() == job.error.to_record()  # type: ignore[union-attr]


async def test_database_is_wal(state: GatewayState) -> None:
    rows = await state.jobs._db("PRAGMA journal_mode")
    assert rows[0][0] == "wal"


async def test_queued_jobs_survive_a_restart_in_order(settings: Settings) -> None:
    state = await _open(settings)
    ids = await _submit(state, 3)
    low = await _submit(state, 1, priority="low")
    await state.close(1.0)

    state = await _open(settings)
    try:
        assert [state.worker.queue.position(i) for i in ids + low] == [0, 1, 2, 3]
        async with client(build_apps(state).queue, QUEUE_BASE) as c:
            r = await c.get(f"/fal-ai/lcm/requests/{ids[2]}/status")
        assert (r.status_code, r.json()["status"], r.json()["queue_position"]) == (202, "IN_QUEUE", 2)
    finally:
        await state.close(1.0)


async def test_interrupted_job_is_rerun_until_attempts_run_out(settings: Settings) -> None:
    state = await _open(settings, max_attempts=2)
    (rid,) = await _submit(state, 1)
    job = state.jobs.active[rid]
    await state.jobs.start(job)  # attempt 1 ... then the process dies (no drain)
    await _crash(state)

    state = await _open(settings, max_attempts=2)
    job = state.jobs.active[rid]
    assert (job.status, job.attempts, state.worker.queue.position(rid)) == (Status.IN_QUEUE, 1, 0)
    assert job.seed == 0  # the seed fixed at submit is kept for the re-run
    state.worker.queue.remove(rid)
    await state.jobs.start(job)  # attempt 2 ... and the process dies again
    await _crash(state)

    state = await _open(settings, max_attempts=2)
    try:
        done = await state.jobs.get(rid)
        assert done is not None and done.status is Status.COMPLETED
        assert done.error is not None and done.error.error_type is ErrorType.RUNNER_DISCONNECTED
        assert state.worker.queue.position(rid) is None
    finally:
        await state.close(1.0)


async def test_unfinished_sync_run_is_closed_on_restart(settings: Settings) -> None:
    # A sync run's caller is gone after a restart: the job is closed (503), not re-run for nobody.
    state = await _open(settings)
    job = Job(id="r1", endpoint_id="fal-ai/lcm", subpath="", mode="run", input={"prompt": "x"}, seed=1)
    await state.jobs.add(job)
    await _crash(state)

    state = await _open(settings)
    try:
        done = await state.jobs.get("r1")
        assert done is not None and done.status is Status.COMPLETED
        assert done.error is not None and done.error.status_code == 503
        assert state.worker.queue.position("r1") is None
    finally:
        await state.close(1.0)


async def test_completed_result_is_served_after_restart(settings: Settings) -> None:
    state = await _open(settings)
    (rid,) = await _submit(state, 1)
    job = state.jobs.active[rid]
    state.worker.queue.remove(rid)
    await state.jobs.start(job)
    await state.jobs.finish(job, result=json.dumps({"images": [], "seed": 0}))
    await state.close(1.0)

    state = await _open(settings)
    try:
        async with client(build_apps(state).queue, QUEUE_BASE) as c:
            r = await c.get(f"/fal-ai/lcm/requests/{rid}")
            assert (r.status_code, r.json()) == (200, {"images": [], "seed": 0})
            s = await c.get(f"/fal-ai/lcm/requests/{rid}/status")
            assert s.status_code == 200 and s.json()["status"] == "COMPLETED"
    finally:
        await state.close(1.0)


async def test_backend_down_is_retried_then_503(settings: Settings) -> None:
    state = await _open(settings, start_worker=True, max_attempts=3, retry_delay=0.01)
    try:
        (rid,) = await _submit(state, 1)
        job = await asyncio.wait_for(state.jobs.wait(state.jobs.active[rid]), 10)
        assert job.attempts == 3
        assert job.error is not None and job.error.error_type is ErrorType.RUNNER_SCHEDULING_FAILURE
        async with client(build_apps(state).queue, QUEUE_BASE) as c:
            r = await c.get(f"/fal-ai/lcm/requests/{rid}")
            assert r.status_code == 503
            assert r.headers["x-fal-request-id"] == rid  # so the Python client does not retry it
            assert r.headers["x-fal-error-type"] == "runner_scheduling_failure"
            s = (await c.get(f"/fal-ai/lcm/requests/{rid}/status", params={"logs": "1"})).json()
            assert s["status"] == "COMPLETED" and s["error_type"] == "runner_scheduling_failure"
            # Each retry is in the job's logs, and the logs of every attempt are kept.
            messages = [e["message"] for e in s["logs"]]
            assert sum("retrying" in m for m in messages) == 2 and "attempt 3" in messages
    finally:
        await state.close(1.0)


async def test_sync_run_goes_through_the_same_job_path(settings: Settings) -> None:
    state = await _open(settings, start_worker=True, max_attempts=2, retry_delay=0.01)
    try:
        async with client(build_apps(state).run, RUN_BASE) as c:
            r = await c.post("/fal-ai/lcm", json={"prompt": "a cat", "seed": 3})
        assert r.status_code == 503
        rid = r.headers["x-fal-request-id"]
        assert r.json()["error_type"] == "runner_scheduling_failure"
        job = await state.jobs.get(rid)
        assert job is not None and (job.mode, job.attempts, job.seed) == ("run", 2, 3)
    finally:
        await state.close(1.0)


async def test_drain_keeps_queued_jobs_for_the_next_start(settings: Settings) -> None:
    state = await _open(settings)
    ids = await _submit(state, 2)
    await state.close(drain_timeout=1.0)
    state = await _open(settings)
    try:
        assert all(state.jobs.active[i].status is Status.IN_QUEUE for i in ids)
    finally:
        await state.close(1.0)


async def test_cancel_during_retry_back_off(settings: Settings) -> None:
    state = await _open(settings, start_worker=True, max_attempts=5, retry_delay=30.0)
    try:
        (rid,) = await _submit(state, 1)
        job = state.jobs.active[rid]
        for _ in range(200):  # the first attempt fails at once; the retry waits 30 s
            if job.attempts == 1 and job.status is Status.IN_QUEUE:
                break
            await asyncio.sleep(0.01)
        assert await state.worker.cancel(job) == "requested"
        assert job.status is Status.COMPLETED and job.error is not None
        assert job.error.error_type is ErrorType.REQUEST_CANCELLED
    finally:
        await state.close(1.0)


async def test_while_draining_sync_runs_are_refused_and_submits_kept(settings: Settings) -> None:
    state = await _open(settings)
    await state.worker.drain(timeout=1.0)
    try:
        apps = build_apps(state)
        async with client(apps.run, RUN_BASE) as c:
            r = await c.post("/fal-ai/lcm", json={"prompt": "a cat"})
        assert r.status_code == 503 and r.json()["error_type"] == "runner_disconnected"
        assert r.headers["x-fal-request-id"]
        async with client(apps.queue, QUEUE_BASE) as c:
            r = await c.post("/fal-ai/lcm", json={"prompt": "a cat"})
        assert r.status_code == 200  # durable: the next start runs it
        rid = r.json()["request_id"]
    finally:
        await state.close(1.0)
    state = await _open(settings)
    try:
        assert state.worker.queue.position(rid) == 0
    finally:
        await state.close(1.0)


async def test_recent_jobs_cache_is_bounded_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.gateway import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "RECENT_BYTES", 4000)
    store = await JobStore.open(tmp_path / "jobs.sqlite3")
    try:
        for i in range(10):
            job = Job(id=f"j{i}", endpoint_id="fal-ai/lcm", subpath="", mode="queue", input={}, seed=0)
            await store.add(job)
            await store.finish(job, result=json.dumps({"url": "data:image/jpeg;base64," + "A" * 900}))
        assert store._recent_bytes <= 4000 and len(store._recent) < 10
        assert "j9" in store._recent and "j0" not in store._recent
        evicted = await store.get("j0")  # still served, from the database
        assert evicted is not None and evicted.result is not None and "AAAA" in evicted.result
    finally:
        await store.close()
