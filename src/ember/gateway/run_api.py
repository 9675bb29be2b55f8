"""The run host (fal-protocol.md §4): `POST /{endpoint_id}` runs the request and answers its output.

A sync run is a job like a queued one (same validation, worker, retries and storage); the handler only
waits for it. If the caller hangs up first, the job is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request
from starlette.responses import Response

from ember.gateway.jobs import Job
from ember.gateway.state import GatewayState
from ember.gateway.web import (
    error_response,
    raw_json_response,
    require_key,
    state_of,
    submit_options,
    validated_request,
)


def result_response(job: Job) -> Response:
    """A finished job's answer: the output JSON, or its stored error (status, body, x-fal-error-type)."""
    if job.error is not None:
        return error_response(job.error, job.id)
    assert job.result is not None
    return raw_json_response(job.result, 200, job.id)


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
    require_key(request)
    state = state_of(request)
    valid = await validated_request(request, path)
    job = await state.submit(valid, "run", submit_options(request))
    done = await wait_for_job(request, state, job)
    if done is None:
        return Response(status_code=204, headers={"x-fal-request-id": job.id})  # nobody is listening
    return result_response(done)
