"""The log lines a fal client saw while it waited on a queued request."""

from __future__ import annotations

from types import ModuleType
from typing import Any


def log_messages(fal_client: ModuleType, updates: list[Any]) -> list[str]:
    """Messages of every log line in `subscribe(..., with_logs=True, on_queue_update=updates.append)`'s updates.

    fal-client polls the status every 0.1 s and each status carries all of the request's lines so far, so a
    short request's steps can fall between two IN_PROGRESS polls; the COMPLETED status, which carries every
    line, is therefore read too."""
    statuses = (fal_client.InProgress, fal_client.Completed)
    return [log["message"] for u in updates if isinstance(u, statuses) for log in (u.logs or [])]
