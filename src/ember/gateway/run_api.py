"""The run host (fal-protocol.md §4, §8): `POST /{endpoint_id}` runs the request and answers its
output; `POST /{endpoint_id}/stream` answers server-sent events while it runs.

A sync run or a stream is a job like a queued one (same validation, worker, retries and storage); the
handler only waits for it, or watches it. If the caller hangs up first, the job is cancelled.

Stream events (`data: <json>`), in order:
- while queued: `{"status": "IN_QUEUE", "request_id", "queue_position"}` (once);
- per step: `{"status": "IN_PROGRESS", "request_id", "progress": {"step", "total"}, "logs": [new lines]}`,
  one event for every step the model reported, even when several land while the caller is slow to read
  or the job completes first; log lines logged between steps come in the next step's event, or in an
  event of their own;
- last: the output JSON itself, exactly what a sync run answers, so JS `done()` and the last event of
  PY `fal_client.stream` are the result; or, if the job failed, its error body (`detail`,
  `error_type`, `message`) plus `"status_code"`. Errors found before the job is accepted (422, 401,
  404, 413) are plain JSON answers with that status, as fal does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import Response

from ember.gateway.jobs import Job, Status
from ember.gateway.state import GatewayState
from ember.gateway.web import (
    SSE_KEEPALIVE_S,
    error_response,
    raw_json_response,
    require_key,
    sse_event,
    sse_response,
    state_of,
    submit_options,
    validated_request,
)


def result_response(job: Job) -> Response:
    """A finished job's answer: the output JSON, or its stored error (status, body, x-fal-error-type)."""
    if job.error is not None:
        return error_response(job.error, job.id)
    return raw_json_response(job.result or "null", 200, job.id)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_job(request: Request, state: GatewayState, job: Job) -> Job | None:
    """The finished job, or None when the caller disconnected first (the job is then cancelled)."""
    finished = asyncio.ensure_future(state.jobs.wait(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not finished.done():
            finished.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    if finished.done() and not finished.cancelled():
        return finished.result()
    await state.worker.cancel(job)
    return None


async def run(request: Request, path: str) -> Response:
    owner = require_key(request)
    state = state_of(request)
    valid = await validated_request(request, path)
    job = await state.submit(valid, "run", await submit_options(request, owner))
    done = await wait_for_job(request, state, job)
    if done is None:
        return Response(status_code=204, headers={"x-fal-request-id": job.id})  # nobody is listening
    return result_response(done)


def final_event(job: Job) -> dict[str, Any] | Any:
    if job.error is not None:
        return {**job.error.body(), "status_code": job.error.status_code}
    return json.loads(job.result or "null")


def progress_events(job: Job, sent_logs: int, steps_only: bool = False) -> list[dict[str, Any]]:
    """IN_PROGRESS events for the log lines from `sent_logs` on: one per step logged there (with the lines
    up to its own), then, unless `steps_only`, one for any lines after the last step (with the current
    progress)."""
    events: list[dict[str, Any]] = []
    start = sent_logs
    for logged, step, total in job.steps:
        if logged > start:
            events.append({"status": "IN_PROGRESS", "request_id": job.id, "logs": job.logs[start:logged],
                           "progress": {"step": step, "total": total}})
            start = logged
    if start < len(job.logs) and not steps_only:
        event: dict[str, Any] = {"status": "IN_PROGRESS", "request_id": job.id, "logs": job.logs[start:]}
        if job.progress is not None:
            event["progress"] = {"step": job.progress[0], "total": job.progress[1]}
        events.append(event)
    return events


async def job_events(state: GatewayState, job: Job) -> AsyncIterator[bytes]:
    """The stream events of `job` until it completes (see the module docstring)."""
    sent_logs = 0
    announced_queue = False
    try:
        while True:
            if job.status is Status.COMPLETED:  # final: no change event needed (none is left behind)
                for event in progress_events(job, sent_logs, steps_only=True):  # steps it ran past
                    yield sse_event(event)
                yield sse_event(final_event(job))
                return
            changed = state.jobs.change_event(job.id)
            if job.status is Status.IN_QUEUE and not announced_queue:
                announced_queue = True
                yield sse_event({"status": "IN_QUEUE", "request_id": job.id,
                                 "queue_position": state.worker.position(job)})
            elif job.status is Status.IN_PROGRESS and len(job.logs) != sent_logs:
                for event in progress_events(job, sent_logs):
                    yield sse_event(event)
                sent_logs = len(job.logs)
            try:
                await asyncio.wait_for(changed.wait(), SSE_KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
    finally:
        if job.status is not Status.COMPLETED:  # the caller went away: stop the work
            state.worker.cancel_soon(job)


async def stream(request: Request, path: str) -> Response:
    owner = require_key(request)
    state = state_of(request)
    valid = await validated_request(request, path, ("/stream",))
    job = await state.submit(valid, "run", await submit_options(request, owner))
    return sse_response(job_events(state, job), job.id)
