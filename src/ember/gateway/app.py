"""Assembly: the three ASGI apps over one shared GatewayState (STYLE.md 2).

- run   (https, EMBER_RUN_PORT):   POST /{endpoint_id} sync run; GET /files/{name}
- queue (https, EMBER_QUEUE_PORT): submit, status, result, cancel
- http  (plain, EMBER_HTTP_PORT):  /api/fal/proxy for the JS client's proxyUrl; GET /files/{name}
All three answer GET /health and GET /ready without a key.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from starlette.routing import Route

from ember.gateway import ops, queue_api, run_api
from ember.gateway.proxy import FalProxy
from ember.gateway.state import GatewayState
from ember.gateway.web import RequestIdMiddleware, install_error_handlers


@dataclass(frozen=True)
class GatewayApps:
    run: FastAPI
    queue: FastAPI
    http: FastAPI


def _app(state: GatewayState, title: str) -> FastAPI:
    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.ember = state
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.add_api_route("/health", ops.health, methods=["GET"])
    app.add_api_route("/ready", ops.ready, methods=["GET"])
    return app


def build_run_app(state: GatewayState) -> FastAPI:
    app = _app(state, "ember run host")
    app.add_api_route("/files/{name}", ops.file, methods=["GET", "HEAD"])
    app.add_api_route("/{path:path}", run_api.run, methods=["POST"])
    return app


def build_queue_app(state: GatewayState) -> FastAPI:
    app = _app(state, "ember queue host")
    app.add_api_route("/{path:path}", queue_api.submit, methods=["POST"])
    app.add_api_route("/{path:path}", queue_api.get_request, methods=["GET"])
    app.add_api_route("/{path:path}", queue_api.cancel, methods=["PUT"])
    return app


def build_http_app(state: GatewayState, run: FastAPI, queue: FastAPI) -> FastAPI:
    app = _app(state, "ember http listener")
    app.add_api_route("/files/{name}", ops.file, methods=["GET", "HEAD"])
    app.router.routes.append(Route("/api/fal/proxy", FalProxy(run, queue)))
    return app


def build_apps(state: GatewayState) -> GatewayApps:
    run = build_run_app(state)
    queue = build_queue_app(state)
    return GatewayApps(run=run, queue=queue, http=build_http_app(state, run, queue))
