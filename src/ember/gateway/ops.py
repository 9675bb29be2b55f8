"""Routes every listener answers without a key: liveness, readiness; and the stored output files."""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.responses import FileResponse, Response

from ember.endpoints.registry import ENDPOINTS
from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.files import CONTENT_TYPES
from ember.gateway.web import json_response, state_of

READY_TIMEOUT_S = 5.0


async def health(request: Request) -> Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: Triton is up and every endpoint's model is loaded."""
    models = sorted({e.triton_model for e in ENDPOINTS.values()})
    try:
        ok = await asyncio.wait_for(state_of(request).backend.ready(models), READY_TIMEOUT_S)
    except TimeoutError:
        ok = False
    if not ok:
        raise ApiError(ErrorType.RUNNER_SCHEDULING_FAILURE,
                       f"the inference server or one of its models ({', '.join(models)}) is not ready")
    return json_response({"status": "ready", "models": models})


async def file(request: Request, name: str) -> Response:
    """An output image, by the name in its URL. Names are unguessable; no key is needed (as fal's CDN)."""
    path = state_of(request).files.path_of(name)
    if path is None:
        raise ApiError(ErrorType.NOT_FOUND, "file not found")
    return FileResponse(
        path, media_type=CONTENT_TYPES[path.suffix.lstrip(".")],
        headers={"cache-control": "public, max-age=31536000, immutable"},
    )
