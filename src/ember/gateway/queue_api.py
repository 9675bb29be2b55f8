"""The queue host (fal-protocol.md §5): submit, status, result, cancel.

Submit is `POST /{endpoint_id}[/sub]`; the rest address `/{app}/requests/{id}...`, told apart from
submit by method. Status answers 202 while IN_QUEUE / IN_PROGRESS and 200 once COMPLETED; failures and
cancels are COMPLETED with `error` and `error_type`, since the Python client rejects any other status.
`GET .../status/stream` sends the same status bodies as server-sent events on every change, each with
only the log lines not sent before (JS accumulates them), and ends right after COMPLETED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import Response

from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.jobs import Job, Status
from ember.gateway.paths import RequestPath, parse_request_path
from ember.gateway.run_api import result_response
from ember.gateway.state import GatewayState
from ember.gateway.web import (
    SSE_KEEPALIVE_S,
    json_response,
    require_key,
    sse_event,
    sse_response,
    state_of,
    submit_options,
    validated_request,
)

_TRUE = ("1", "true")


async def submit(request: Request, path: str) -> Response:
    owner = require_key(request)
    state = state_of(request)
    valid = await validated_request(request, path)
    job = await state.submit(valid, "queue", await submit_options(request, owner))
    body = {
        "status": Status.IN_QUEUE.value,
        "request_id": job.id,
        **state.request_urls(job),
        "queue_position": state.worker.position(job),
        "gateway_request_id": job.id,
    }
    return json_response(body, 200, job.id)


def _request_path(path: str) -> RequestPath:
    parsed = parse_request_path(path)
    if parsed is None:
        raise ApiError(ErrorType.NOT_FOUND, f"'{path}' is not a request path: use "
                       "/{owner}/{alias}/requests/{request_id}[/status|/cancel]")
    return parsed


async def _find(state: GatewayState, rp: RequestPath) -> Job | None:
    job = await state.jobs.get(rp.request_id)
    return job if job is not None and job.app == rp.app else None


def status_body(state: GatewayState, job: Job, with_logs: bool, logs_from: int = 0) -> tuple[int, dict[str, Any]]:
    """fal's status body (fal-protocol.md §5.2); `logs_from` skips the log lines already sent."""
    body: dict[str, Any] = {"status": job.status.value, "request_id": job.id, **state.request_urls(job)}
    logs = job.logs[logs_from:] if with_logs else None
    if job.status is Status.IN_QUEUE:
        body["queue_position"] = state.worker.position(job)
        return 202, body
    if job.status is Status.IN_PROGRESS:
        body["logs"] = logs
        return 202, body
    body["logs"] = logs
    body["metrics"] = {"inference_time": job.inference_time}
    body["error"] = job.error.message if job.error else None
    body["error_type"] = job.error.error_type.value if job.error else None
    return 200, body


async def get_request(request: Request, path: str) -> Response:
    """GET .../requests/{id}/status and GET .../requests/{id} (the result)."""
    require_key(request)
    state = state_of(request)
    rp = _request_path(path)
    if rp.action == "cancel":
        raise ApiError(ErrorType.METHOD_NOT_ALLOWED, "use PUT on .../requests/{request_id}/cancel")
    job = await _find(state, rp)
    if job is None:
        raise ApiError(ErrorType.NOT_FOUND, f"Request {rp.request_id} not found")
    with_logs = request.query_params.get("logs", "").lower() in _TRUE
    if rp.action == "status":
        code, body = status_body(state, job, with_logs)
        return json_response(body, code, job.id)
    if rp.action == "status/stream":
        return sse_response(_status_events(state, job, with_logs), job.id)
    if job.status is not Status.COMPLETED:
        error = ApiError(ErrorType.BAD_REQUEST, f"Request {job.id} is {job.status.value}; "
                         "fetch the result once its status is COMPLETED")
        return json_response(error.body(), error.status_code, job.id, {"x-fal-error-type": error.error_type.value})
    return result_response(job)


async def _status_events(state: GatewayState, job: Job, with_logs: bool) -> AsyncIterator[bytes]:
    sent_logs = 0
    last: tuple[Any, ...] | None = None
    while True:
        # COMPLETED is final: a finished job needs no change event (and leaves none behind).
        changed = None if job.status is Status.COMPLETED else state.jobs.change_event(job.id)
        sent_logs = min(sent_logs, len(job.logs))
        _, body = status_body(state, job, with_logs, sent_logs)
        key = (job.status, body.get("queue_position"))
        if key != last or (with_logs and body["logs"]):
            yield sse_event(body)
            last = key
            sent_logs = len(job.logs)
        if changed is None:
            return
        queued = job.status is Status.IN_QUEUE  # its position moves with other jobs: look again each second
        try:
            await asyncio.wait_for(changed.wait(), 1.0 if queued else SSE_KEEPALIVE_S)
        except TimeoutError:
            if not queued:
                yield b": keep-alive\n\n"


async def cancel(request: Request, path: str) -> Response:
    """PUT .../requests/{id}/cancel: 202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED, 404 NOT_FOUND."""
    require_key(request)
    state = state_of(request)
    rp = _request_path(path)
    if rp.action != "cancel":
        raise ApiError(ErrorType.METHOD_NOT_ALLOWED, "use PUT only on .../requests/{request_id}/cancel")
    job = await _find(state, rp)
    if job is None:
        detail = f"Request {rp.request_id} not found"
        return json_response({"status": "NOT_FOUND", "detail": detail, "message": detail}, 404)
    if await state.worker.cancel(job) == "already_completed":
        detail = f"Request {job.id} is already completed"
        return json_response({"status": "ALREADY_COMPLETED", "detail": detail, "message": detail}, 400, job.id)
    return json_response({"status": "CANCELLATION_REQUESTED"}, 202, job.id)
