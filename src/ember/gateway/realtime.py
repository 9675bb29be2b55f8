"""Realtime: a websocket at `/{endpoint_id}/realtime` on the run host (fal-protocol.md §9), in the shape
of fal's own "unary" realtime runner (fal-ai/fal `projects/fal/src/fal/realtime.py`).

- Auth on the upgrade: `?fal_jwt_token=<token from POST /tokens/>` naming this app's alias, or
  `Authorization: Key ...`. Refused upgrades get an HTTP 401 (403 for a token of another app).
- Frames in: binary msgpack maps (or JSON text) holding the endpoint's input. Frames out: the output
  as a binary msgpack map, then a `{"type": "x-fal-message", "action": "timings", "timing": s}` text
  frame. Inputs are answered one at a time, in the order received; `request_id` in an input is echoed
  in its output (and in its error).
- `max_buffering=N` (1..60): at most N inputs wait; a newer one pushes out the oldest (stale frames
  are dropped, as fal's runner does with a deque of that length). Default 60.
- Errors for one input are text frames `{"type": "x-fal-error", "error": CODE, "reason": ...}`
  (VALIDATION_ERROR with the 422 `detail`, INVALID_INPUT for an undecodable frame, SERVICE_UNAVAILABLE,
  INTERNAL_ERROR); the session stays open. After EMBER_REALTIME_IDLE_TIMEOUT seconds without input the
  session gets fal's `TIMEOUT` ("no inputs, reconnect when needed!") and is closed with 1000.
- Inputs bypass the queue: they go straight to the backend (the model stays loaded in Triton, and the
  connection is kept), through the same `execute` as queued jobs. Images come back inline (data URIs),
  since a realtime caller wants bytes, not a file to fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections import deque
from typing import Any

import msgpack  # type: ignore[import-untyped]
from starlette.websockets import WebSocket, WebSocketDisconnect

from ember.endpoints.common import InputError
from ember.endpoints.registry import find_endpoint
from ember.gateway.backend import BackendError
from ember.gateway.errors import ApiError, ErrorType, from_input_error
from ember.gateway.paths import app_of
from ember.gateway.state import RANDOM_SEED_BOUND, GatewayState
from ember.gateway.web import error_response, validate_input
from ember.gateway.worker import backend_error, execute

log = logging.getLogger(__name__)

MAX_BUFFERING = 60
MAX_FRAME_BYTES = 32 * 1024 * 1024


def _control(error: str, reason: str, **extra: Any) -> str:
    return json.dumps({"type": "x-fal-error", "error": error, "reason": reason, **extra}, separators=(",", ":"))


async def _deny(websocket: WebSocket, error: ApiError) -> None:
    """Refuse the upgrade with an HTTP answer (401, 403, 404, 422), or a close where the server cannot."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(error))
    else:
        await websocket.close(code=1008, reason=error.message[:120])


def _authorize(websocket: WebSocket, state: GatewayState, endpoint_id: str) -> ApiError | None:
    token = websocket.query_params.get("fal_jwt_token")
    if token:
        claims = state.signer.verify(token, "realtime")
        if claims is None:
            return ApiError(ErrorType.UNAUTHORIZED, "the realtime token is invalid or has expired")
        alias = app_of(endpoint_id).split("/")[-1]
        if alias not in claims.get("apps", []):
            return ApiError(ErrorType.FORBIDDEN, f"the realtime token is not valid for {alias!r}")
        return None
    if state.keys.verify(websocket.headers.get("authorization")):
        return None
    return ApiError(ErrorType.UNAUTHORIZED, "send ?fal_jwt_token=<token from POST /tokens/> or 'Authorization: Key ...'")


async def realtime(websocket: WebSocket, path: str) -> None:
    state: GatewayState = websocket.app.state.ember
    found = find_endpoint(path.strip("/"))
    if found is None or found[1] != "/realtime":
        await _deny(websocket, ApiError(ErrorType.NOT_FOUND, f"no realtime endpoint at /{path}"))
        return
    endpoint = found[0]
    refused = _authorize(websocket, state, endpoint.endpoint_id)
    raw_buffering = websocket.query_params.get("max_buffering")
    buffering = MAX_BUFFERING
    if refused is None and raw_buffering is not None:
        if not raw_buffering.isdigit() or not 1 <= int(raw_buffering) <= MAX_BUFFERING:
            refused = ApiError.validation([{"loc": ["query", "max_buffering"], "type": "value_error",
                                            "msg": f"an integer from 1 to {MAX_BUFFERING}"}])
        else:
            buffering = int(raw_buffering)
    if refused is None and state.stopping:
        refused = ApiError(ErrorType.RUNNER_DISCONNECTED, "the server is shutting down")
    if refused is not None:
        await _deny(websocket, refused)
        return
    await websocket.accept()
    session = Session(websocket, state, endpoint, buffering)
    state.metrics.realtime_sessions.inc()
    try:
        await session.run()
    finally:
        state.metrics.realtime_sessions.dec()


class Session:
    def __init__(self, websocket: WebSocket, state: GatewayState, endpoint: Any, buffering: int) -> None:
        self.ws = websocket
        self.state = state
        self.endpoint = endpoint
        self.pending: deque[Any] = deque()
        self.buffering = buffering
        self.ready = asyncio.Event()
        self.closed = False  # the input side ended (idle timeout or the client's close)

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive())
        worker = asyncio.create_task(self._answer())
        try:
            await asyncio.wait({receiver, worker}, return_when=asyncio.FIRST_COMPLETED)
            if receiver.done() and receiver.exception() is None and receiver.result() == "idle":
                await worker  # answer what is buffered, then say why the session ends
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    await self.ws.send_text(_control("TIMEOUT", "no inputs, reconnect when needed!"))
                    await self.ws.close(1000)
        finally:
            for task in (receiver, worker):
                task.cancel()
            await asyncio.gather(receiver, worker, return_exceptions=True)

    async def _receive(self) -> str:
        idle = self.state.settings.realtime_idle_timeout
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), idle if idle > 0 else None)
                except TimeoutError:
                    return "idle"
                if message["type"] == "websocket.disconnect":
                    return "closed"
                frame = message.get("bytes") if message.get("bytes") is not None else message.get("text")
                if frame is None:
                    continue
                if len(self.pending) >= self.buffering:
                    self.pending.popleft()
                    self.state.metrics.realtime_frames.labels("dropped").inc()
                self.pending.append(frame)
                self.ready.set()
        finally:
            self.closed = True
            self.ready.set()

    async def _answer(self) -> None:
        while True:
            if not self.pending:
                if self.closed:
                    return
                self.ready.clear()
                await self.ready.wait()
                continue
            await self._one(self.pending.popleft())

    async def _one(self, frame: bytes | str) -> None:
        try:
            data = msgpack.unpackb(frame, raw=False) if isinstance(frame, bytes) else json.loads(frame)
        except (ValueError, msgpack.UnpackException) as exc:
            self.state.metrics.realtime_frames.labels("error").inc()
            await self.ws.send_text(_control("INVALID_INPUT", f"the frame is not msgpack or JSON: {exc}"))
            return
        request_id = data.get("request_id") if isinstance(data, dict) else None
        echo = {"request_id": request_id} if isinstance(request_id, str) else {}
        started = time.perf_counter()
        try:
            valid = validate_input(self.endpoint, "/realtime", data)
            seed = self.endpoint.seed_of(valid.input)
            output = await execute(
                self.endpoint, valid.input, secrets.randbelow(RANDOM_SEED_BOUND) if seed is None else seed,
                str(uuid.uuid4()), self.state.backend, self.state.media, self.state.files.sink(sync_mode=True),
                lambda s, t: None)
        except (ApiError, InputError, BackendError) as exc:
            error = (exc if isinstance(exc, ApiError) else from_input_error(exc) if isinstance(exc, InputError)
                     else backend_error(exc, 1))
            code = {ErrorType.VALIDATION: "VALIDATION_ERROR", ErrorType.RUNNER_SCHEDULING_FAILURE: "SERVICE_UNAVAILABLE"
                    }.get(error.error_type, "INTERNAL_ERROR")
            self.state.metrics.realtime_frames.labels("error").inc()
            extra: dict[str, Any] = {**echo, "status_code": error.status_code}
            if isinstance(error.detail, list):
                extra["detail"] = error.detail
            await self.ws.send_text(_control(code, error.message, **extra))
            return
        except Exception as exc:
            log.exception("realtime input failed")
            self.state.metrics.realtime_frames.labels("error").inc()
            await self.ws.send_text(_control("INTERNAL_ERROR", f"{type(exc).__name__}", **echo))
            return
        result = output.model_dump(mode="json")
        if echo and not result.get("request_id"):
            result.update(echo)
        await self.ws.send_bytes(msgpack.packb(result, use_bin_type=True))
        await self.ws.send_text(json.dumps({"type": "x-fal-message", "action": "timings",
                                            "timing": time.perf_counter() - started}, separators=(",", ":")))
        self.state.metrics.realtime_frames.labels("answered").inc()

