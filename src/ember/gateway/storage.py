"""fal's REST and CDN hosts, as far as the official clients use them (fal-protocol.md §9.1, §10), on
the REST listener (EMBER_REST_PORT, https) and through the JS proxy (target `https://rest.fal.ai/...`).

REST (`Authorization: Key`):
- `POST /tokens/` {"allowed_apps": [alias], "token_expiration": s} -> a bare JSON string: a realtime token.
- `POST /storage/auth/token?storage_type=fal-cdn-v3` -> {token, token_type: "Bearer", base_url, expires_at}:
  the Python client's CDN token.
- `POST /storage/upload/initiate[?storage_type=fal-cdn-v3|gcs]` and `.../initiate-multipart` with
  {file_name, content_type} -> {upload_url, file_url}. `upload_url` is a signed, expiring URL that
  takes an unauthenticated `PUT` (JS, and the Python `fal` fallback); multipart: `PUT {upload_url}/{n}`
  answers {partNumber, etag}, then `POST {upload_url}/complete` {"parts": [...]}.
CDN (`Authorization: Bearer <CDN token>`), the Python client's default path:
- `POST /files/upload` (raw body, X-Fal-File-Name) -> {access_url}.
- `POST /files/upload/multipart` -> {access_url, uploadId}; `PUT {access_url}/multipart/{uploadId}/{n}`
  (ETag header); `POST {access_url}/multipart/{uploadId}/complete` {"parts": [...]}.

Files are served at `GET /files/{name}` (ops.file). Upload lifecycle: `X-Fal-Object-Lifecycle` (or
`-Preference`) `expiration_duration_seconds` makes the file expire (404, then deleted).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import Request
from starlette.responses import Response

from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.files import FileTooLarge, clean_content_type, extension_for, new_name
from ember.gateway.web import (
    json_response,
    lifecycle_ttl,
    parse_json_object,
    read_body,
    require_key,
    state_of,
)

CDN_TOKEN_TTL_S = 3600
MAX_REALTIME_TOKEN_TTL_S = 24 * 3600
UPLOAD_CORS = {"access-control-allow-origin": "*", "access-control-allow-methods": "PUT, POST, OPTIONS",
               "access-control-allow-headers": "content-type, content-length", "access-control-max-age": "600",
               "access-control-expose-headers": "etag, x-fal-request-id"}


# -- realtime tokens -------------------------------------------------------------------------------

async def realtime_token(request: Request) -> Response:
    owner = require_key(request)
    state = state_of(request)
    body = parse_json_object(await read_body(request, 64 * 1024))
    problems = []
    apps = body.get("allowed_apps") if isinstance(body, dict) else None
    if not isinstance(apps, list) or not apps or len(apps) > 16 or not all(
            isinstance(a, str) and 0 < len(a) <= 200 for a in apps):
        problems.append({"loc": ["body", "allowed_apps"], "msg": "a list of app aliases", "type": "list_type"})
    ttl = body.get("token_expiration", 120) if isinstance(body, dict) else 120
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_REALTIME_TOKEN_TTL_S:
        problems.append({"loc": ["body", "token_expiration"], "type": "value_error",
                         "msg": f"seconds, from 1 to {MAX_REALTIME_TOKEN_TTL_S}"})
    if problems:
        raise ApiError.validation(problems)
    token = state.signer.issue("realtime", ttl, apps=apps, sub=owner)
    return json_response(token, 201)


# -- the signed-URL path (JS, and the Python `fal` fallback) ---------------------------------------

def _upload_request(body: Any) -> tuple[str, str | None]:
    if not isinstance(body, dict):
        raise ApiError.validation([{"loc": ["body"], "msg": "a JSON object", "type": "model_type"}])
    content_type = clean_content_type(body.get("content_type") if isinstance(body.get("content_type"), str)
                                      else None)
    name = body.get("file_name")
    return content_type, name if isinstance(name, str) else None


def _ttl(request: Request) -> float | None:
    return lifecycle_ttl(request, "x-fal-object-lifecycle") or lifecycle_ttl(request,
                                                                              "x-fal-object-lifecycle-preference")


async def initiate(request: Request) -> Response:
    """`POST /storage/upload/initiate` and `/initiate-multipart`."""
    require_key(request)
    state = state_of(request)
    content_type, file_name = _upload_request(parse_json_object(await read_body(request, 64 * 1024)))
    name = new_name(extension_for(content_type, file_name))
    token = state.signer.issue("upload", state.settings.upload_url_ttl, name=name, ct=content_type,
                               ttl=_ttl(request))
    return json_response({"upload_url": f"{state.rest_base}/storage/upload/{token}",
                          "file_url": state.files.url_of(name, state.rest_base)})


def _upload_claims(request: Request, token: str) -> dict[str, Any]:
    claims = state_of(request).signer.verify(token, "upload")
    if claims is None:
        raise ApiError(ErrorType.FORBIDDEN, "this upload URL is invalid or has expired")
    return claims


def _too_large(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, f"the file is larger than {limit} bytes")


async def put_signed(request: Request, token: str) -> Response:
    """`PUT {upload_url}`: the whole file, no key (the URL is the permission)."""
    claims = _upload_claims(request, token)
    state = state_of(request)
    limit = state.settings.max_upload_bytes
    _too_large(request, limit)
    try:
        size = await state.files.write_stream(claims["name"], claims["ct"], request.stream(), limit, claims["ttl"])
    except FileTooLarge as exc:
        raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, str(exc)) from None
    return json_response({"file_url": state.files.url_of(claims["name"], state.rest_base), "file_size": size},
                         headers=UPLOAD_CORS)


async def put_signed_part(request: Request, token: str, number: int) -> Response:
    """`PUT {upload_url}/{n}` -> {partNumber, etag} (JS reads the JSON)."""
    claims = _upload_claims(request, token)
    etag = await _write_part(request, claims["name"], number)
    return json_response({"partNumber": number, "etag": etag}, headers={**UPLOAD_CORS, "etag": etag})


async def complete_signed(request: Request, token: str) -> Response:
    claims = _upload_claims(request, token)
    url = await _complete(request, claims)
    return json_response({"file_url": url}, headers=UPLOAD_CORS)


async def upload_preflight(request: Request, path: str = "") -> Response:
    return Response(status_code=204, headers=UPLOAD_CORS)


async def _write_part(request: Request, name: str, number: int) -> str:
    if not 1 <= number <= 10000:
        raise ApiError(ErrorType.NOT_FOUND, "part numbers run from 1 to 10000")
    try:
        return await state_of(request).files.write_part(name, number, request.stream())
    except FileTooLarge as exc:
        raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, str(exc)) from None


async def _complete(request: Request, claims: dict[str, Any]) -> str:
    state = state_of(request)
    body = parse_json_object(await read_body(request, 4 * 1024 * 1024))
    raw_parts = body.get("parts") if isinstance(body, dict) else None
    parts: list[tuple[int, str]] = []
    if isinstance(raw_parts, list):
        for part in raw_parts:
            if isinstance(part, dict) and isinstance(part.get("partNumber"), int) and isinstance(part.get("etag"), str):
                parts.append((part["partNumber"], part["etag"]))
    if not parts or len(parts) != len(raw_parts or []):
        raise ApiError.validation([{"loc": ["body", "parts"], "msg": "a list of {partNumber, etag}",
                                    "type": "list_type"}])
    try:
        await state.files.complete_parts(claims["name"], parts, claims["ct"], state.settings.max_upload_bytes,
                                         claims["ttl"])
    except FileTooLarge as exc:
        raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, str(exc)) from None
    except ValueError as exc:
        raise ApiError.validation([{"loc": ["body", "parts"], "msg": str(exc), "type": "value_error"}]) from None
    return state.files.url_of(claims["name"], state.rest_base)


# -- the CDN path (Python fal_v3, the default) -----------------------------------------------------

async def cdn_token(request: Request) -> Response:
    """`POST /storage/auth/token?storage_type=fal-cdn-v3`."""
    owner = require_key(request)
    state = state_of(request)
    token = state.signer.issue("cdn", CDN_TOKEN_TTL_S, sub=owner)
    # The client refreshes at expiry and compares with an aware UTC time: the offset is required.
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=CDN_TOKEN_TTL_S - 60)
    return json_response({"token": token, "token_type": "Bearer", "base_url": state.rest_base,
                          "expires_at": expires.isoformat()})


def _require_cdn_token(request: Request) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or state_of(request).signer.verify(token.strip(), "cdn") is None:
        raise ApiError(ErrorType.UNAUTHORIZED, "a CDN token is required: POST /storage/auth/token first")


def _cdn_file(request: Request) -> tuple[str, str]:
    content_type = clean_content_type(request.headers.get("content-type"))
    return new_name(extension_for(content_type, request.headers.get("x-fal-file-name"))), content_type


async def cdn_upload(request: Request) -> Response:
    """`POST /files/upload`: the raw file as the body."""
    _require_cdn_token(request)
    state = state_of(request)
    limit = state.settings.max_upload_bytes
    _too_large(request, limit)
    name, content_type = _cdn_file(request)
    try:
        size = await state.files.write_stream(name, content_type, request.stream(), limit, _ttl(request))
    except FileTooLarge as exc:
        raise ApiError(ErrorType.PAYLOAD_TOO_LARGE, str(exc)) from None
    return json_response({"access_url": state.files.url_of(name, state.rest_base), "content_type": content_type,
                          "file_name": name, "file_size": size})


async def cdn_multipart(request: Request) -> Response:
    """`POST /files/upload/multipart` -> {access_url, uploadId}; the id is a signed upload token."""
    _require_cdn_token(request)
    state = state_of(request)
    name, content_type = _cdn_file(request)
    upload_id = state.signer.issue("upload", state.settings.upload_url_ttl, name=name, ct=content_type,
                                   ttl=_ttl(request))
    return json_response({"access_url": state.files.url_of(name, state.rest_base), "uploadId": upload_id})


def _cdn_claims(request: Request, name: str, upload_id: str) -> dict[str, Any]:
    _require_cdn_token(request)
    claims = _upload_claims(request, upload_id)
    if claims["name"] != name:
        raise ApiError(ErrorType.FORBIDDEN, "this upload id belongs to another file")
    return claims


async def cdn_part(request: Request, name: str, upload_id: str, number: int) -> Response:
    claims = _cdn_claims(request, name, upload_id)
    etag = await _write_part(request, claims["name"], number)
    return json_response({"partNumber": number, "etag": etag}, headers={"etag": etag})


async def cdn_complete(request: Request, name: str, upload_id: str) -> Response:
    claims = _cdn_claims(request, name, upload_id)
    return json_response({"access_url": await _complete(request, claims)})
