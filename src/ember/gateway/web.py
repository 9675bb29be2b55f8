"""HTTP plumbing every listener shares: JSON answers, fal-shaped errors, the request-id header, auth,
bounded body reading and input validation."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.endpoints.common import InputError
from ember.endpoints.registry import find_endpoint
from ember.gateway.errors import ApiError, ErrorType, from_input_error, from_pydantic
from ember.gateway.jobs import Priority
from ember.gateway.state import GatewayState, SubmitOptions, ValidRequest

log = logging.getLogger(__name__)

REQUEST_ID = "x-fal-request-id"
# Sub-paths after an endpoint id that run and submit serve; "/stream" and "/realtime" come later.
SERVED_SUBPATHS = ("",)


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


def error_response(error: ApiError, request_id: str | None = None) -> Response:
    return json_response(
        error.body(), error.status_code, request_id or str(uuid.uuid4()),
        {"x-fal-error-type": error.error_type.value},
    )


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


def require_key(request: Request) -> None:
    if not state_of(request).keys.verify(request.headers.get("authorization")):
        if "authorization" not in request.headers:
            raise ApiError(ErrorType.UNAUTHORIZED,
                           "Missing credentials: send the header 'Authorization: Key <key_id>:<key_secret>'")
        raise ApiError(ErrorType.UNAUTHORIZED, "Invalid API key")


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


async def validated_request(request: Request, path: str) -> ValidRequest:
    """The endpoint `path` names and its validated input: 404 for an unknown endpoint or sub-path,
    413 for a body too large, 422 for input the schema or the endpoint's checks refuse."""
    found = find_endpoint(path.strip("/"))
    if found is None:
        raise ApiError(ErrorType.NOT_FOUND, f"Application '{path.strip('/')}' not found")
    endpoint, subpath = found
    if subpath not in SERVED_SUBPATHS:
        raise ApiError(ErrorType.NOT_FOUND, f"{endpoint.endpoint_id} has no path '{subpath}'")
    data = parse_json_object(await read_body(request, state_of(request).settings.max_body_bytes))
    try:
        inp = endpoint.input_model.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc)
    try:
        endpoint.check(inp)
    except InputError as exc:
        raise from_input_error(exc)
    return ValidRequest(endpoint=endpoint, subpath=subpath, input=inp, data=data)


def submit_options(request: Request) -> SubmitOptions:
    """`?fal_webhook=`, `X-Fal-Queue-Priority`, `X-Fal-Request-Timeout` and `X-Fal-Runner-Hint`."""
    problems = []
    webhook = request.query_params.get("fal_webhook")
    if webhook is not None:
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append({"loc": ["query", "fal_webhook"], "msg": "must be an http(s) URL", "type": "url_parsing"})
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
                         runner_hint=request.headers.get("x-fal-runner-hint"))
