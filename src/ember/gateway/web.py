"""HTTP plumbing every listener shares: JSON answers, fal-shaped errors, the request-id header, auth,
bounded body reading and input validation."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.endpoints.common import InputError
from ember.endpoints.registry import find_endpoint
from ember.gateway.errors import ApiError, ErrorType, from_input_error, from_pydantic
from ember.gateway.fetcher import FetchError
from ember.gateway.jobs import Priority
from ember.gateway.state import GatewayState, SubmitOptions, ValidRequest

log = logging.getLogger(__name__)

REQUEST_ID = "x-fal-request-id"
# Seconds a submit may spend resolving its webhook's host (a failure to resolve is not an error then:
# delivery retries; an address that is not public is).
WEBHOOK_CHECK_TIMEOUT_S = 2.0


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_response(
    body: Any, status_code: int = 200, request_id: str | None = None, headers: dict[str, str] | None = None,
) -> Response:
    return raw_json_response(_dumps(body), status_code, request_id, headers)


def raw_json_response(
    content: bytes | str, status_code: int = 200, request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    all_headers = dict(headers or {})
    if request_id is not None:
        all_headers[REQUEST_ID] = request_id
    return Response(content=content, status_code=status_code, media_type="application/json", headers=all_headers)


# Seconds between SSE comment lines while nothing happens (keeps proxies from closing an idle stream).
SSE_KEEPALIVE_S = 10.0


def sse_event(body: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (fal-protocol.md §8)."""
    return b"data: " + _dumps(body) + b"\n\n"


def sse_response(events: Any, request_id: str) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={
        REQUEST_ID: request_id, "cache-control": "no-store", "x-accel-buffering": "no"})


def error_response(error: ApiError, request_id: str | None = None) -> Response:
    return json_response(error.body(), error.status_code, request_id or str(uuid.uuid4()), error.headers())


class RequestIdMiddleware:
    """Puts `x-fal-request-id` on every answer that lacks one (fal-protocol.md §3.2)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == REQUEST_ID.encode() for name, _ in headers):
                    headers.append((REQUEST_ID.encode(), str(uuid.uuid4()).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error_type = {404: ErrorType.NOT_FOUND, 405: ErrorType.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorType.BAD_REQUEST)
        return error_response(ApiError(error_type, str(exc.detail)))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(ErrorType.INTERNAL, "internal server error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.ember
    return state


def require_key(request: Request) -> str:
    """The caller's owner id (auth.KeyStore.owner_of); 401 without a valid `Authorization: Key`."""
    owner = state_of(request).keys.owner_of(request.headers.get("authorization"))
    if owner is None:
        if "authorization" not in request.headers:
            raise ApiError(ErrorType.UNAUTHORIZED,
                           "Missing credentials: send the header 'Authorization: Key <key_id>:<key_secret>'")
        raise ApiError(ErrorType.UNAUTHORIZED, "Invalid API key")
    return owner


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 past `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, f"request body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, f"request body is larger than {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(ErrorType.BAD_REQUEST, "the client disconnected while sending the body") from None
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> Any:
    """The JSON body; 422 in FastAPI's `json_invalid` shape when it does not parse."""
    if not body.strip():
        raise ApiError.validation([{"loc": ["body"], "msg": "Field required", "type": "missing"}])
    try:
        return json.loads(body, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise ApiError.validation([{"loc": ["body", exc.pos], "msg": "JSON decode error", "type": "json_invalid"}])
    except (ValueError, UnicodeDecodeError):
        raise ApiError.validation([{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}])


async def validated_request(request: Request, path: str, subpaths: tuple[str, ...] = ("",)) -> ValidRequest:
    """The endpoint `path` names and its validated input: 404 for an unknown endpoint or a sub-path
    not in `subpaths`, 413 for a body too large, 422 for input the schema or the endpoint's checks
    refuse."""
    found = find_endpoint(path.strip("/"))
    if found is None:
        raise ApiError(ErrorType.NOT_FOUND, f"Application '{path.strip('/')}' not found")
    endpoint, subpath = found
    if subpath not in subpaths:
        raise ApiError(ErrorType.NOT_FOUND, f"{endpoint.endpoint_id} has no path '{subpath}'")
    data = parse_json_object(await read_body(request, state_of(request).settings.max_body_bytes))
    return validate_input(endpoint, subpath, data)


def validate_input(endpoint: Any, subpath: str, data: Any) -> ValidRequest:
    """One input against the endpoint's schema and checks (the realtime frames use this too)."""
    try:
        inp = endpoint.input_model.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc)
    try:
        endpoint.check(inp)
    except InputError as exc:
        raise from_input_error(exc)
    return ValidRequest(endpoint=endpoint, subpath=subpath, input=inp, data=data)


def lifecycle_ttl(request: Request, header: str) -> float | None:
    """`expiration_duration_seconds` of an X-Fal-Object-Lifecycle[-Preference] header (fal-protocol.md
    §3.1), or None; 422 when the header is not that JSON. `initial_acl` is accepted and not enforced:
    file URLs are unguessable capabilities."""
    raw = request.headers.get(header)
    if raw is None:
        return None
    problem = ApiError.validation([{"loc": ["header", header.lower()], "type": "value_error",
                                    "msg": "must be JSON with a positive expiration_duration_seconds"}])
    try:
        value = json.loads(raw)
    except ValueError:
        raise problem from None
    seconds = value.get("expiration_duration_seconds") if isinstance(value, dict) else 0
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 2**31:
        raise problem
    return float(seconds)


async def check_webhook_url(state: GatewayState, url: str) -> str | None:
    """Why a webhook URL is refused at submit, or None. A host that does not resolve (yet) passes:
    delivery resolves again, and retries; one that resolves to a non-public address does not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return "must be an http(s) URL without credentials"
    try:
        ipaddress.ip_address(parts.hostname)
        literal = True
    except ValueError:
        literal = False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await asyncio.wait_for(state.fetcher.resolve(parts.hostname, port), WEBHOOK_CHECK_TIMEOUT_S)
    except FetchError as exc:
        if exc.kind == "url_not_allowed" or literal:
            return exc.msg
    except (TimeoutError, ValueError):
        pass
    return None


async def submit_options(request: Request, owner: str = "") -> SubmitOptions:
    """`?fal_webhook=`, `X-Fal-Queue-Priority`, `X-Fal-Request-Timeout`, `X-Fal-Runner-Hint` and
    `X-Fal-Object-Lifecycle-Preference`."""
    problems = []
    webhook = request.query_params.get("fal_webhook")
    if webhook is not None:
        why = await check_webhook_url(state_of(request), webhook)
        if why is not None:
            problems.append({"loc": ["query", "fal_webhook"], "msg": why, "type": "url_parsing"})
    priority: Priority = "normal"
    raw_priority = request.headers.get("x-fal-queue-priority")
    if raw_priority is not None:
        if raw_priority.strip().lower() == "low":
            priority = "low"
        elif raw_priority.strip().lower() != "normal":
            problems.append({"loc": ["header", "x-fal-queue-priority"], "msg": "must be 'normal' or 'low'",
                             "type": "literal_error"})
    start_timeout = None
    raw_timeout = request.headers.get("x-fal-request-timeout")
    if raw_timeout is not None:
        try:
            start_timeout = float(raw_timeout)
            if not start_timeout > 0 or start_timeout == float("inf"):
                raise ValueError(raw_timeout)
        except ValueError:
            problems.append({"loc": ["header", "x-fal-request-timeout"],
                             "msg": "must be a positive number of seconds", "type": "float_parsing"})
    if problems:
        raise ApiError.validation(problems)
    return SubmitOptions(webhook_url=webhook, priority=priority, start_timeout=start_timeout,
                         runner_hint=request.headers.get("x-fal-runner-hint"), owner=owner,
                         files_ttl=lifecycle_ttl(request, "x-fal-object-lifecycle-preference"))
