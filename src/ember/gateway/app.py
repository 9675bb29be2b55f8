"""Assembly: the four ASGI apps over one shared GatewayState (STYLE.md 2).

- run   (https, EMBER_RUN_PORT):   POST /{endpoint_id} sync run, POST /{endpoint_id}/stream (SSE),
                                   WS /{endpoint_id}/realtime; GET /files/{name}
- queue (https, EMBER_QUEUE_PORT): submit, status, status/stream, result, cancel
- rest  (https, EMBER_REST_PORT):  fal's REST + CDN hosts: /tokens/, /storage/..., /files/upload...,
                                   /.well-known/jwks.json; GET /files/{name}
- http  (plain, EMBER_HTTP_PORT):  /api/fal/proxy for the JS client's proxyUrl; GET /files/{name}
Every listener answers GET /health, /ready, /metrics, /.well-known/jwks.json, /openapi.json and /docs
without a key, and puts x-fal-request-id on every answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.endpoints.registry import find_endpoint
from ember.gateway import openapi, ops, queue_api, run_api, storage
from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.metrics import Metrics
from ember.gateway.proxy import FalProxy
from ember.gateway.realtime import realtime
from ember.gateway.state import GatewayState
from ember.gateway.web import RequestIdMiddleware, install_error_handlers


@dataclass(frozen=True)
class GatewayApps:
    run: FastAPI
    queue: FastAPI
    rest: FastAPI
    http: FastAPI


class MetricsMiddleware:
    """HTTP answers by listener, method and status into ember_http_request_duration_seconds."""

    def __init__(self, app: ASGIApp, metrics: Metrics, listener: str) -> None:
        self.app = app
        self.histogram = metrics.http_latency
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.histogram.labels(self.listener, scope["method"], str(status)).observe(time.perf_counter() - started)


def _app(state: GatewayState, listener: str) -> FastAPI:
    app = FastAPI(title=f"ember {listener} host", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.ember = state
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, listener=listener)
    openapi_json, docs = openapi.routes(listener)
    for path, handler in (("/health", ops.health), ("/ready", ops.ready), ("/metrics", ops.metrics),
                          ("/.well-known/jwks.json", ops.jwks), ("/openapi.json", openapi_json), ("/docs", docs)):
        app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)
    app.add_api_route("/files/{name}", ops.file, methods=["GET", "HEAD"])
    return app


async def _run_or_stream(request: Request, path: str) -> Response:
    found = find_endpoint(path.strip("/"))
    if found is not None and found[1] == "/stream":
        return await run_api.stream(request, path)
    return await run_api.run(request, path)


def build_run_app(state: GatewayState) -> FastAPI:
    app = _app(state, "run")
    app.add_api_websocket_route("/{path:path}", realtime)
    app.add_api_route("/{path:path}", _run_or_stream, methods=["POST"])
    return app


def build_queue_app(state: GatewayState) -> FastAPI:
    app = _app(state, "queue")
    app.add_api_route("/{path:path}", queue_api.submit, methods=["POST"])
    app.add_api_route("/{path:path}", queue_api.get_request, methods=["GET"])
    app.add_api_route("/{path:path}", queue_api.cancel, methods=["PUT"])
    return app


def build_rest_app(state: GatewayState) -> FastAPI:
    app = _app(state, "rest")
    routes: list[tuple[str, Callable[..., Any], str]] = [
        ("/tokens/", storage.realtime_token, "POST"),
        ("/tokens", storage.realtime_token, "POST"),
        ("/storage/auth/token", storage.cdn_token, "POST"),
        ("/storage/upload/initiate", storage.initiate, "POST"),
        ("/storage/upload/initiate-multipart", storage.initiate, "POST"),
        ("/storage/upload/{token}", storage.put_signed, "PUT"),
        ("/storage/upload/{token}/{number:int}", storage.put_signed_part, "PUT"),
        ("/storage/upload/{token}/complete", storage.complete_signed, "POST"),
        ("/storage/upload/{path:path}", storage.upload_preflight, "OPTIONS"),
        ("/files/upload", storage.cdn_upload, "POST"),
        ("/files/upload/multipart", storage.cdn_multipart, "POST"),
        ("/files/{name}/multipart/{upload_id}/{number:int}", storage.cdn_part, "PUT"),
        ("/files/{name}/multipart/{upload_id}/complete", storage.cdn_complete, "POST"),
    ]
    for path, handler, method in routes:
        app.add_api_route(path, handler, methods=[method])

    async def not_found(request: Request, path: str) -> Response:
        raise ApiError(ErrorType.NOT_FOUND, f"/{path} is not served here")

    app.add_api_route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE"])
    return app


def build_http_app(state: GatewayState, run: FastAPI, queue: FastAPI, rest: FastAPI) -> FastAPI:
    app = _app(state, "http")
    app.router.routes.append(Route("/api/fal/proxy", FalProxy(run, queue, rest)))
    return app


def build_apps(state: GatewayState) -> GatewayApps:
    run = build_run_app(state)
    queue = build_queue_app(state)
    rest = build_rest_app(state)
    return GatewayApps(run=run, queue=queue, rest=rest, http=build_http_app(state, run, queue, rest))
