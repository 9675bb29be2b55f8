"""fal's request paths (fal-protocol.md §4, §5).

- Run and submit name the full endpoint id, sub-path included: `/fal-ai/lcm`, `/fal-ai/lcm/stream`.
- Status, result and cancel name only the `{app}`: `{owner}/{alias}`, or `{ns}/{owner}/{alias}` for
  ns in `workflows`, `comfy`, then `/requests/{id}[/status[/stream]|/cancel]`. The queue host tells
  submit from these by method (an endpoint sub-path could itself contain `requests/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NAMESPACES = ("workflows", "comfy")

Action = Literal["result", "status", "status/stream", "cancel"]
_ACTIONS: dict[str, Action] = {"": "result", "status": "status", "status/stream": "status/stream",
                               "cancel": "cancel"}


def app_of(endpoint_id: str) -> str:
    """The `{app}` part of an endpoint id: "fal-ai/stable-cascade/sote-diffusion" -> "fal-ai/stable-cascade"."""
    segments = endpoint_id.strip("/").split("/")
    n = 3 if segments[0] in NAMESPACES else 2
    return "/".join(segments[:n])


@dataclass(frozen=True)
class RequestPath:
    app: str
    request_id: str
    action: Action


def parse_request_path(path: str) -> RequestPath | None:
    """`{app}/requests/{id}[/status|/status/stream|/cancel]` (no leading slash needed), else None."""
    segments = path.strip("/").split("/")
    n = 3 if segments[0] in NAMESPACES else 2
    if len(segments) < n + 2 or segments[n] != "requests" or not segments[n + 1]:
        return None
    if any(not s for s in segments[:n]):
        return None
    action = _ACTIONS.get("/".join(segments[n + 2:]))
    if action is None:
        return None
    return RequestPath(app="/".join(segments[:n]), request_id=segments[n + 1], action=action)
