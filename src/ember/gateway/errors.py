"""The gateway's one closed set of errors and the one table from error to HTTP status (STYLE.md 3).

Bodies follow fal (fal-protocol.md §6.1):
- request errors: `{"detail": "<text>", "error_type": "<type>"}` plus the `x-fal-error-type` header;
- validation errors: 422 `{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`.
Every body also carries a top-level `"message"` string: the JS client shows `body.message`, never `detail`.

Codes avoid 408/409 (the Python client retries them ten times), and every 5xx carries
`x-fal-request-id` so that the Python client does not take it for an ingress error and retry it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from ember.endpoints.common import InputError


class ErrorType(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    VALIDATION = "validation_error"
    # The job was cancelled by its caller (fal-protocol.md §5.5: result after cancel is a 4xx).
    REQUEST_CANCELLED = "request_cancelled"
    # fal's own request error types (docs.fal.ai "Request Error Types").
    REQUEST_TIMEOUT = "request_timeout"
    RUNNER_SCHEDULING_FAILURE = "runner_scheduling_failure"
    RUNNER_DISCONNECTED = "runner_disconnected"
    INTERNAL = "internal_server_error"


HTTP_STATUS: dict[ErrorType, int] = {
    ErrorType.BAD_REQUEST: 400,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.FORBIDDEN: 403,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.PAYLOAD_TOO_LARGE: 413,
    ErrorType.VALIDATION: 422,
    ErrorType.REQUEST_CANCELLED: 400,
    ErrorType.REQUEST_TIMEOUT: 504,
    ErrorType.RUNNER_SCHEDULING_FAILURE: 503,
    ErrorType.RUNNER_DISCONNECTED: 503,
    ErrorType.INTERNAL: 500,
}

# One validation problem as fal (FastAPI) reports it.
Detail = dict[str, Any]


class ApiError(Exception):
    """An error answer: its type fixes the status code; `detail` is a string, or a list for 422."""

    def __init__(
        self, error_type: ErrorType, detail: str | list[Detail], *, timeout_type: str | None = None,
    ) -> None:
        super().__init__(detail if isinstance(detail, str) else _summary(detail))
        self.error_type = error_type
        self.detail = detail
        # "user" on a 504 for an expired X-Fal-Request-Timeout: neither client retries it, and JS sets
        # ApiError.isUserTimeout (fal-protocol.md §3.2, §7).
        self.timeout_type = timeout_type

    @classmethod
    def start_timeout(cls, seconds: float) -> ApiError:
        return cls(ErrorType.REQUEST_TIMEOUT, f"Request timed out: it did not start within the {seconds:g} s "
                   "of its X-Fal-Request-Timeout", timeout_type="user")

    def headers(self) -> dict[str, str]:
        """The headers of an answer carrying this error."""
        headers = {"x-fal-error-type": self.error_type.value}
        if self.timeout_type:
            headers["x-fal-request-timeout-type"] = self.timeout_type
        return headers

    @property
    def status_code(self) -> int:
        return HTTP_STATUS[self.error_type]

    @property
    def message(self) -> str:
        return self.detail if isinstance(self.detail, str) else _summary(self.detail)

    def body(self) -> dict[str, Any]:
        if self.error_type is ErrorType.VALIDATION:
            # fal's model-error shape: `detail` only (plus `message` for JS).
            return {"detail": self.detail, "message": self.message}
        return {"detail": self.detail, "error_type": self.error_type.value, "message": self.message}

    def to_record(self) -> dict[str, Any]:
        """What the jobs store keeps; `from_record` gives the same error back."""
        record: dict[str, Any] = {"error_type": self.error_type.value, "detail": self.detail}
        if self.timeout_type:
            record["timeout_type"] = self.timeout_type
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ApiError:
        return cls(ErrorType(record["error_type"]), record["detail"], timeout_type=record.get("timeout_type"))

    @classmethod
    def validation(cls, details: list[Detail]) -> ApiError:
        return cls(ErrorType.VALIDATION, details)


def _summary(details: list[Detail]) -> str:
    parts = []
    for d in details:
        loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
        parts.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
    return "; ".join(parts) or "invalid request"


def from_pydantic(exc: ValidationError, prefix: str = "body") -> ApiError:
    """pydantic errors in FastAPI's request-validation shape: just loc, msg, type."""
    return ApiError.validation(
        [{"loc": [prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    )


def from_input_error(exc: InputError) -> ApiError:
    return ApiError.validation([exc.detail()])
