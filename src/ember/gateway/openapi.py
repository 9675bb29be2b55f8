"""OpenAPI documents, one per listener (`GET /openapi.json`, Swagger UI at `GET /docs`).

Routes are generic (`/{path}`: one code path for every endpoint), so the document is built from the
ENDPOINTS registry instead of from the routes: each endpoint gets its own paths with its exact input
and output models (the fal JSON, pydantic's JSON schema).
"""

from __future__ import annotations

from typing import Any

from fastapi.openapi.docs import get_swagger_ui_html
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ember.endpoints.registry import ENDPOINTS
from ember.gateway.paths import app_of
from ember.gateway.web import json_response, state_of

REF = "#/components/schemas/{model}"
_ERROR = {"type": "object", "properties": {"detail": {}, "error_type": {"type": "string"},
                                           "message": {"type": "string"}}}
_VALIDATION_ERROR = {"type": "object", "properties": {
    "detail": {"type": "array", "items": {"type": "object", "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"}, "type": {"type": "string"}}}},
    "message": {"type": "string"}}}
_LOG = {"type": "object", "properties": {k: {"type": "string"} for k in ("message", "level", "source", "timestamp")}}
_STATUS = {"type": "object", "required": ["status", "request_id"], "properties": {
    "status": {"type": "string", "enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]},
    "request_id": {"type": "string"}, "queue_position": {"type": "integer"},
    "logs": {"anyOf": [{"type": "array", "items": {"$ref": REF.format(model="RequestLog")}}, {"type": "null"}]},
    "metrics": {"type": "object", "properties": {"inference_time": {"type": ["number", "null"]}}},
    "error": {"type": ["string", "null"]}, "error_type": {"type": ["string", "null"]},
    "response_url": {"type": "string"}, "status_url": {"type": "string"}, "cancel_url": {"type": "string"}}}
_SUBMIT = {"type": "object", "properties": {
    "status": {"type": "string"}, "request_id": {"type": "string"}, "gateway_request_id": {"type": "string"},
    "response_url": {"type": "string"}, "status_url": {"type": "string"}, "cancel_url": {"type": "string"},
    "queue_position": {"type": "integer"}}}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description or "OK", "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Missing or invalid API key", 403: "Not allowed", 404: "Not found",
            413: "Body too large", 422: "Validation error (fal's detail shape)", 503: "Inference server unavailable",
            504: "Start timeout expired (x-fal-request-timeout-type: user)"}
    return {str(c): _json({"$ref": REF.format(model="ValidationError" if c == 422 else "Error")}, text[c])
            for c in codes}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF.format(model=model.__name__)}


def _schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = []
    for endpoint in ENDPOINTS.values():
        models += [(endpoint.input_model, "validation"), (endpoint.output_model, "serialization")]
    _, top = models_json_schema(models, ref_template=REF)
    schemas = dict(top.get("$defs", {}))
    schemas.update(Error=_ERROR, ValidationError=_VALIDATION_ERROR, RequestLog=_LOG, QueueStatus=_STATUS,
                   QueueSubmit=_SUBMIT)
    return schemas


_HEADERS = [
    {"name": "X-Fal-Request-Timeout", "in": "header", "schema": {"type": "number"},
     "description": "Seconds the request may wait before it starts; then 504 + x-fal-request-timeout-type: user"},
    {"name": "X-Fal-Object-Lifecycle-Preference", "in": "header", "schema": {"type": "string"},
     "description": 'JSON {"expiration_duration_seconds": N}: output files expire after N s'},
]


def _run_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS.values():
        eid, inp, out = endpoint.endpoint_id, endpoint.input_model, endpoint.output_model
        body = {"required": True, "content": {"application/json": {"schema": _ref(inp)}}}
        paths[f"/{eid}"] = {"post": {
            "summary": f"Run {eid} and answer its output", "tags": [eid], "operationId": f"run_{eid}",
            "parameters": _HEADERS, "requestBody": body,
            "responses": {"200": _json(_ref(out)), **_errors(401, 404, 413, 422, 503, 504)}}}
        paths[f"/{eid}/stream"] = {"post": {
            "summary": f"Run {eid}, answering server-sent events: progress, then the output", "tags": [eid],
            "operationId": f"stream_{eid}", "parameters": _HEADERS, "requestBody": body,
            "responses": {"200": {"description": "text/event-stream; the last event is the output",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(401, 404, 422)}}}
        paths[f"/{eid}/realtime"] = {"get": {
            "summary": f"WebSocket (upgrade): msgpack {inp.__name__} frames in, {out.__name__} frames out",
            "tags": [eid], "operationId": f"realtime_{eid}",
            "parameters": [{"name": "fal_jwt_token", "in": "query", "schema": {"type": "string"}},
                           {"name": "max_buffering", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 60}}],
            "responses": {"101": {"description": "Switching protocols"}, **_errors(401, 403, 404, 422)}}}
    return paths


def _queue_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS.values():
        eid, app = endpoint.endpoint_id, app_of(endpoint.endpoint_id)
        rid = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
        logs = {"name": "logs", "in": "query", "schema": {"type": "string", "enum": ["1", "0", "true", "false"]}}
        paths[f"/{eid}"] = {"post": {
            "summary": f"Queue a {eid} request", "tags": [eid], "operationId": f"submit_{eid}",
            "parameters": [{"name": "fal_webhook", "in": "query", "schema": {"type": "string"}},
                           {"name": "X-Fal-Queue-Priority", "in": "header",
                            "schema": {"type": "string", "enum": ["normal", "low"]}},
                           {"name": "X-Fal-Runner-Hint", "in": "header", "schema": {"type": "string"}}, *_HEADERS],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(endpoint.input_model)}}},
            "responses": {"200": _json({"$ref": REF.format(model="QueueSubmit")}), **_errors(401, 404, 413, 422)}}}
        base = f"/{app}/requests/{{request_id}}"
        paths[f"{base}/status"] = {"get": {
            "summary": "Status: 202 while IN_QUEUE / IN_PROGRESS, 200 once COMPLETED", "tags": [eid],
            "operationId": f"status_{eid}", "parameters": [rid, logs],
            "responses": {"200": _json({"$ref": REF.format(model="QueueStatus")}),
                          "202": _json({"$ref": REF.format(model="QueueStatus")}), **_errors(401, 404)}}}
        paths[f"{base}/status/stream"] = {"get": {
            "summary": "Status as server-sent events with new log lines; ends after COMPLETED", "tags": [eid],
            "operationId": f"status_stream_{eid}", "parameters": [rid, logs],
            "responses": {"200": {"description": "text/event-stream of QueueStatus",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}}}
        paths[base] = {"get": {
            "summary": "The result (the output, or the stored error with its status code)", "tags": [eid],
            "operationId": f"result_{eid}", "parameters": [rid],
            "responses": {"200": _json(_ref(endpoint.output_model)), **_errors(400, 401, 404, 422, 503, 504)}}}
        paths[f"{base}/cancel"] = {"put": {
            "summary": "Cancel: 202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED, 404 NOT_FOUND", "tags": [eid],
            "operationId": f"cancel_{eid}", "parameters": [rid],
            "responses": {"202": _json({"type": "object"}), **_errors(400, 401, 404)}}}
    return paths


def _rest_paths() -> dict[str, Any]:
    obj = {"type": "object"}
    return {
        "/tokens/": {"post": {"summary": "A realtime token: bare JSON string", "operationId": "tokens",
                              "responses": {"201": _json({"type": "string"}), **_errors(401, 422)}}},
        "/storage/auth/token": {"post": {"summary": "A CDN upload token", "operationId": "cdn_token",
                                         "responses": {"200": _json(obj)}}},
        "/storage/upload/initiate": {"post": {"summary": "A signed upload URL and the file URL",
                                              "operationId": "initiate", "responses": {"200": _json(obj)}}},
        "/storage/upload/initiate-multipart": {"post": {"summary": "The same, for a multipart upload",
                                                        "operationId": "initiate_multipart",
                                                        "responses": {"200": _json(obj)}}},
        "/files/upload": {"post": {"summary": "Upload a file (CDN token)", "operationId": "cdn_upload",
                                   "responses": {"200": _json(obj)}}},
        "/.well-known/jwks.json": {"get": {"summary": "The webhook signing key (Ed25519)", "operationId": "jwks",
                                           "responses": {"200": _json(obj)}}},
    }


def document(state: Any, listener: str) -> dict[str, Any]:
    servers = {"run": state.run_base, "queue": state.queue_base, "rest": state.rest_base, "http": state.http_base}
    paths = {"run": _run_paths, "queue": _queue_paths, "rest": _rest_paths}.get(listener, dict)()
    if listener == "http":
        paths = {"/api/fal/proxy": {m: {"summary": "The JS client's proxyUrl, routed by x-fal-target-url",
                                        "operationId": f"proxy_{m}", "responses": {"200": {"description": "OK"}}}
                                    for m in ("get", "post", "put")}}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"ember {listener} host", "version": "1",
                 "description": "fal.ai-compatible endpoints (fal-protocol.md): auth `Authorization: Key <key>`."},
        "servers": [{"url": servers[listener]}],
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"key": {"type": "apiKey", "in": "header", "name": "Authorization"}}},
        "security": [{"key": []}],
    }


def routes(listener: str) -> tuple[Any, Any]:
    async def openapi_json(request: Request) -> Response:
        return json_response(document(state_of(request), listener))

    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"ember {listener} host")

    return openapi_json, docs
