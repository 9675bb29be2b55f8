"""Server-sent events: `POST /{endpoint}/stream` on the run host (progress, then the output) and
`GET .../status/stream` on the queue host (status events with incremental logs, closed after
COMPLETED), over the real listeners and a FakeBackend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from ember.gateway.jobs import Job, JobStore
from ember.gateway.run_api import job_events, progress_events
from ember.gateway.state import GatewayState
from tests.gateway.conftest import FakeBackend, live_gateway, make_settings

SMALL = {"prompt": "a cat", "image_size": {"width": 64, "height": 48}, "seed": 5}


async def _events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


async def test_run_stream_sends_progress_then_the_output(tmp_path: Path) -> None:
    async with (live_gateway(tmp_path / "var") as gw, gw.client(gw.run) as c,
                c.stream("POST", "/fal-ai/lcm/stream", json={**SMALL, "num_inference_steps": 3},
                         headers={"accept": "text/event-stream"}) as r):
        assert r.status_code == 200 and r.headers["x-fal-request-id"]
        events = await _events(r)
    progress = [e["progress"] for e in events if e.get("status") == "IN_PROGRESS" and "progress" in e]
    assert progress == [{"step": 1, "total": 3}, {"step": 2, "total": 3}, {"step": 3, "total": 3}]
    logs = [line["message"] for e in events if e.get("status") == "IN_PROGRESS" for line in e["logs"]]
    assert logs.count("step 2/3") == 1  # each event carries only new lines
    final = events[-1]
    assert final["seed"] == 5 and final["images"][0]["width"] == 64
    assert set(final) == {"images", "timings", "seed", "num_inference_steps", "request_id", "nsfw_content_detected"}


async def test_a_stream_that_falls_behind_still_gets_every_step(tmp_path: Path) -> None:
    # What the stream sends when it next looks at a job that logged a line and two steps since its last
    # event, then a third step and a line after it.
    store = await JobStore.open(tmp_path / "jobs.sqlite3")
    job = Job(id="s1", endpoint_id="fal-ai/lcm", subpath="", mode="run", input={"prompt": "x"}, seed=1)
    try:
        await store.add(job)
        await store.start(job)
        store.log(job, "loading")
        assert progress_events(job, 0) == [{"status": "IN_PROGRESS", "request_id": "s1",
                                            "logs": job.logs[:1]}]  # no step yet: no progress
        store.progress(job, 1, 3)
        store.log(job, "between")
        store.progress(job, 2, 3)
        behind = progress_events(job, 1)
        store.progress(job, 3, 3)
        store.log(job, "decoding")
        last = progress_events(job, len(job.logs) - 2)
        at_completion = progress_events(job, len(job.logs) - 2, steps_only=True)  # the final event follows
    finally:
        await store.close()
    assert [(e["progress"]["step"], [line["message"] for line in e["logs"]]) for e in behind] == [
        (1, ["step 1/3"]), (2, ["between", "step 2/3"])]
    assert [(e["progress"]["step"], [line["message"] for line in e["logs"]]) for e in last] == [
        (3, ["step 3/3"]), (3, ["decoding"])]
    assert at_completion == last[:1]


async def test_a_stream_that_first_looks_after_completion_gets_the_steps_then_the_output(tmp_path: Path) -> None:
    state = await GatewayState.open(make_settings(tmp_path / "var"), FakeBackend(), start_worker=False)
    job = Job(id="s2", endpoint_id="fal-ai/lcm", subpath="", mode="run", input={"prompt": "x"}, seed=1)
    try:
        await state.jobs.add(job)
        await state.jobs.start(job)
        state.jobs.progress(job, 1, 2)
        state.jobs.progress(job, 2, 2)
        await state.jobs.finish(job, result='{"images": []}')
        events = [json.loads(chunk.removeprefix(b"data: ")) async for chunk in job_events(state, job)]
    finally:
        await state.close(1.0)
    assert events == [
        {"status": "IN_PROGRESS", "request_id": "s2", "logs": job.logs[:1], "progress": {"step": 1, "total": 2}},
        {"status": "IN_PROGRESS", "request_id": "s2", "logs": job.logs[1:2], "progress": {"step": 2, "total": 2}},
        {"images": []},
    ]


async def test_run_stream_errors_before_and_after_the_stream_starts(tmp_path: Path) -> None:
    async with live_gateway(tmp_path / "var", EMBER_MAX_ATTEMPTS="1") as gw, gw.client(gw.run) as c:
        r = await c.post("/fal-ai/lcm/stream", json={"prompt": "x", "num_inference_steps": 99})
        assert r.status_code == 422 and r.headers["content-type"] == "application/json"
        assert r.json()["detail"][0]["loc"] == ["body", "num_inference_steps"]
        async with c.stream("POST", "/fal-ai/lcm/stream", json={**SMALL, "prompt": "fail internal"}) as r:
            assert r.status_code == 200
            events = await _events(r)
        assert events[-1]["status_code"] == 500 and events[-1]["error_type"] == "internal_server_error"
        r = await c.post("/fal-ai/lcm/nope", json=SMALL)
        assert r.status_code == 404


async def test_run_stream_caller_leaving_cancels_the_job(tmp_path: Path) -> None:
    backend = FakeBackend(step_s=0.2)
    async with live_gateway(tmp_path / "var", backend) as gw, gw.client(gw.run) as c:
        async with c.stream("POST", "/fal-ai/lcm/stream", json={**SMALL, "num_inference_steps": 12}) as r:
            async for line in r.aiter_lines():
                if '"step":1' in line:
                    break  # leave after the first step
        for _ in range(100):
            if backend.cancelled:
                break
            await asyncio.sleep(0.05)
        assert backend.cancelled == 1


async def test_status_stream_sends_incremental_logs_and_closes_after_completed(tmp_path: Path) -> None:
    async with live_gateway(tmp_path / "var", FakeBackend(step_s=0.05)) as gw, gw.client(gw.queue) as c:
        rid = (await c.post("/fal-ai/lcm", json={**SMALL, "num_inference_steps": 4})).json()["request_id"]
        async with c.stream("GET", f"/fal-ai/lcm/requests/{rid}/status/stream", params={"logs": "1"}) as r:
            assert r.status_code == 200 and r.headers["x-fal-request-id"] == rid
            events = await asyncio.wait_for(_events(r), 20)
        statuses = [e["status"] for e in events]
        assert statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1
        assert set(statuses) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
        messages = [line["message"] for e in events for line in (e.get("logs") or [])]
        steps = [m for m in messages if m.startswith("step ")]
        assert steps == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]  # each line exactly once
        final = events[-1]
        assert final["error"] is None and final["metrics"]["inference_time"] > 0
        # A stream opened after completion sends the COMPLETED status once and ends.
        async with c.stream("GET", f"/fal-ai/lcm/requests/{rid}/status/stream", params={"logs": "0"}) as r:
            late = await _events(r)
        assert [e["status"] for e in late] == ["COMPLETED"] and late[0]["logs"] is None
