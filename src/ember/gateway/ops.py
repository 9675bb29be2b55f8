"""Routes every listener answers without a key: liveness, readiness, metrics, the webhook JWKS, and
the stored files."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.responses import FileResponse, Response

from ember.endpoints.registry import ENDPOINTS
from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.files import INLINE_TYPES
from ember.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ember.gateway.web import json_response, state_of

READY_TIMEOUT_S = 5.0


async def health(request: Request) -> Response:
    """Liveness: the process answers (also while Triton is down, and while draining)."""
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: not stopping, Triton is up and every endpoint's model is loaded."""
    state = state_of(request)
    if state.stopping:
        raise ApiError(ErrorType.RUNNER_DISCONNECTED, "the server is shutting down")
    models = sorted({e.triton_model for e in ENDPOINTS.values()})
    try:
        ok = await asyncio.wait_for(state.backend.ready(models), READY_TIMEOUT_S)
    except TimeoutError:
        ok = False
    if not ok:
        raise ApiError(ErrorType.RUNNER_SCHEDULING_FAILURE,
                       f"the inference server or one of its models ({', '.join(models)}) is not ready")
    return json_response({"status": "ready", "models": models})


async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def jwks(request: Request) -> Response:
    """The public key webhooks are signed with (webhooks.py), as fal publishes at
    https://rest.fal.ai/.well-known/jwks.json."""
    return json_response(state_of(request).webhook_key.jwks(), headers={"cache-control": "public, max-age=3600"})


async def file(request: Request, name: str) -> Response:
    """A stored file (output image or upload), by the name in its URL. Names are unguessable; no key
    is needed (as on fal's CDN). Uploaded content never runs as a page of ours: nosniff, a sandbox CSP,
    and types outside a short list are served as attachments."""
    info = state_of(request).files.info(name)
    if info is None:
        raise ApiError(ErrorType.NOT_FOUND, "file not found")
    expires_at = state_of(request).files.expires_at(name)
    headers = {
        "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; sandbox",
        "access-control-allow-origin": "*",
        "cache-control": (f"private, max-age={max(0, int(expires_at - time.time()))}" if expires_at
                          else "public, max-age=31536000, immutable"),
    }
    if info.content_type not in INLINE_TYPES:
        headers["content-disposition"] = "attachment"
    return FileResponse(info.path, media_type=info.content_type, headers=headers)
