"""`/api/fal/proxy`: the endpoint the JS client's `proxyUrl` points at (fal-protocol.md §11).

The JS client sends each request here unchanged, plus `x-fal-target-url: <the fal URL it meant>`. Like
the official @fal-ai/server-proxy, we accept only an allow-list of targets (anything else is 400),
require an Authorization header (the client's own key; 401 otherwise), and answer with the target's
status, body and headers. The target is served in-process: the run, queue or REST app is called with
the scope rewritten to the target's path and query, so responses (SSE included) stream through
unbuffered. CORS headers go on every answer so that browsers can call the proxy cross-origin.

The allow-list is the official proxy's default (@fal-ai/server-proxy 1.2.1 `src/config.js`) plus two
targets that it refuses by default but that the JS client needs for features this gateway serves:
`rest.fal.ai/tokens/` (realtime tokens) and `.../initiate-multipart` (uploads over 90 MB).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.web import error_response

TARGET_HEADER = b"x-fal-target-url"
METHODS = ("GET", "POST", "PUT")

# @fal-ai/server-proxy 1.2.1 `src/config.js`: globs over host + path + query.
OFFICIAL_TARGETS = (
    "fal.run/**",
    "queue.fal.run/**",
    "rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
    "rest.fal.ai/storage/upload/complete-multipart?storage_type=fal-cdn-v3",
)
# What this gateway adds (see the module docstring).
EXTRA_TARGETS = (
    "rest.fal.ai/tokens/",
    "rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
)
ALLOWED_TARGETS = OFFICIAL_TARGETS + EXTRA_TARGETS

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", b"x-fal-request-id, x-fal-error-type, x-fal-request-timeout-type"),
]
PREFLIGHT_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST, PUT, OPTIONS"),
    (b"access-control-allow-headers", (
        b"authorization, content-type, accept, x-fal-target-url, x-fal-queue-priority, x-fal-runner-hint, "
        b"x-fal-request-timeout, x-fal-object-lifecycle-preference, x-fal-object-lifecycle")),
    (b"access-control-max-age", b"600"),
]

# ASGI scope keys that describe the connection; everything else (routing state) is the outer app's.
_SCOPE_KEYS = ("type", "asgi", "http_version", "scheme", "server", "client", "extensions")


def _glob(pattern: str) -> re.Pattern[str]:
    """`**` matches anything, `*` anything but '/', other characters literally."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(f"^{regex}$")


_ALLOWED = tuple(_glob(p) for p in ALLOWED_TARGETS)


def allowed_target(url: str) -> tuple[str, str, str] | None:
    """(host, path, query) of an allowed target URL, else None."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        return None
    host = parts.hostname.lower()
    if parts.port not in (None, 443):
        return None
    path = parts.path or "/"
    target = host + path + (f"?{parts.query}" if parts.query else "")
    if not any(p.match(target) for p in _ALLOWED):
        return None
    return host, path, parts.query


class FalProxy:
    """ASGI app for `/api/fal/proxy`; `run_app`, `queue_app` and `rest_app` serve fal.run, queue.fal.run
    and rest.fal.ai."""

    def __init__(self, run_app: ASGIApp, queue_app: ASGIApp, rest_app: ASGIApp) -> None:
        self.targets: dict[str, ASGIApp] = {"fal.run": run_app, "queue.fal.run": queue_app, "rest.fal.ai": rest_app}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                message = {**message, "headers": headers + CORS_HEADERS}
            await send(message)

        method = scope["method"]
        if method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": CORS_HEADERS + PREFLIGHT_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        error: ApiError | None = None
        target = None
        if method not in METHODS:
            error = ApiError(ErrorType.METHOD_NOT_ALLOWED, f"the proxy answers {', '.join(METHODS)} and OPTIONS")
        elif TARGET_HEADER not in headers:
            error = ApiError(ErrorType.BAD_REQUEST, "Invalid request: missing the x-fal-target-url header")
        else:
            target = allowed_target(headers[TARGET_HEADER].decode("latin-1"))
            if target is None:
                error = ApiError(ErrorType.BAD_REQUEST, "Invalid request: target URL is not allowed by this proxy")
        if error is None and b"authorization" not in headers:
            error = ApiError(ErrorType.UNAUTHORIZED, "Missing credentials: configure the fal client with a key "
                             "(it is sent as 'Authorization: Key <key_id>:<key_secret>')")
        if error is None and target is not None and target[0] not in self.targets:
            error = ApiError(ErrorType.NOT_FOUND, f"{target[0]}{target[1]} is not served by this gateway yet")
        if error is not None or target is None:
            await error_response(error or ApiError(ErrorType.BAD_REQUEST, "Invalid request"))(scope, receive, send_cors)
            return

        host, path, query = target
        inner_headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host", TARGET_HEADER)]
        inner: Scope = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        inner.update(
            method=method, scheme="https", path=unquote(path), raw_path=path.encode("utf-8"),
            query_string=query.encode("latin-1"), root_path="", headers=[(b"host", host.encode()), *inner_headers],
        )
        await self.targets[host](inner, receive, send_cors)
