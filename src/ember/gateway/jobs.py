"""Jobs: every accepted request, sync run or queued, persisted in SQLite before it is answered.

The store keeps the unfinished jobs (and a few thousand recently finished ones) in memory, so status
polls at ~10 req/s per waiting client read no disk. Logs of a running job live in memory and are
written with each state change; a job interrupted by a crash is re-run anyway.

States are fal's three (fal-protocol.md §5.2); a failed or cancelled job is COMPLETED with an error.
COMPLETED is final: every write is guarded in SQL (`WHERE status != 'COMPLETED'`), so a job's result
is written once even if two paths race to finish it, and the webhook delivery of a finished job is
inserted in the same transaction as its result (a crash cannot separate the two).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from ember.gateway.db import Database, Statement
from ember.gateway.errors import ApiError
from ember.gateway.paths import app_of

log = logging.getLogger(__name__)

# Finished jobs kept in memory for the polls that follow completion (status again, then result); the
# byte bound matters for sync_mode results, which carry their images as data URIs.
RECENT_JOBS = 4096
RECENT_BYTES = 64 * 1024 * 1024

Mode = Literal["run", "queue"]
Priority = Literal["normal", "low"]


class Status(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


def log_entry(message: str, level: str = "INFO") -> dict[str, str]:
    """One fal `RequestLog` (fal-protocol.md §5.2)."""
    return {"message": message, "level": level, "source": "USER",
            "timestamp": dt.datetime.now(dt.UTC).isoformat()}


@dataclass
class Job:
    id: str
    endpoint_id: str
    subpath: str
    mode: Mode
    input: dict[str, Any]
    seed: int
    priority: Priority = "normal"
    webhook_url: str | None = None
    # X-Fal-Request-Timeout: seconds the request may wait before it first starts.
    start_timeout: float | None = None
    runner_hint: str | None = None
    # Who submitted it: a short digest of the API key (the webhook's X-Fal-Webhook-User-Id).
    owner: str = ""
    # X-Fal-Object-Lifecycle-Preference `expiration_duration_seconds`: output files expire this long
    # after they are written.
    files_ttl: float | None = None
    status: Status = Status.IN_QUEUE
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    inference_time: float | None = None
    logs: list[dict[str, str]] = field(default_factory=list)
    # The output JSON text, exactly as answered.
    result: str | None = None
    error: ApiError | None = None
    # The running attempt's steps, as (len(logs) once its line was logged, step, total): a stream that falls
    # behind still sends one event per step. In memory only.
    steps: list[tuple[int, int, int]] = field(default_factory=list, compare=False, repr=False)

    @property
    def progress(self) -> tuple[int, int] | None:
        """(step, total) of the running attempt's last step."""
        return self.steps[-1][1:] if self.steps else None

    @property
    def app(self) -> str:
        return app_of(self.endpoint_id)

    @property
    def start_deadline(self) -> float | None:
        """When the start timeout expires, if the job has one and has never started."""
        if self.start_timeout is None or self.attempts > 0:
            return None
        return self.created_at + self.start_timeout


_COLUMNS = (
    "id", "endpoint", "subpath", "mode", "input", "seed", "priority", "webhook_url", "start_timeout",
    "runner_hint", "owner", "files_ttl", "status", "attempts", "created_at", "started_at", "finished_at",
    "inference_time", "logs", "result", "error",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    subpath TEXT NOT NULL,
    mode TEXT NOT NULL,
    input TEXT NOT NULL,
    seed INTEGER NOT NULL,
    priority TEXT NOT NULL,
    webhook_url TEXT,
    start_timeout REAL,
    runner_hint TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    inference_time REAL,
    logs TEXT NOT NULL,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (created_at) WHERE status != 'COMPLETED';
-- One row per finished job that named a webhook; the webhook sender owns the row from then on.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    job_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    state TEXT NOT NULL,            -- pending | delivered | failed
    attempts INTEGER NOT NULL,
    next_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_pending ON webhook_deliveries (next_at) WHERE state = 'pending';
"""
# Columns added after the first release (Database.migrate adds them to older databases).
_ADDED_COLUMNS = {"jobs": {"owner": "TEXT NOT NULL DEFAULT ''", "files_ttl": "REAL"}}

_UPSERT = (
    f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    f"ON CONFLICT(id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])} "
    "WHERE jobs.status != 'COMPLETED'"
)

_NEW_DELIVERY = ("INSERT OR IGNORE INTO webhook_deliveries (job_id, url, state, attempts, next_at) "
                 "VALUES (?, ?, 'pending', 0, ?)")


def _row(job: Job) -> tuple[Any, ...]:
    return (
        job.id, job.endpoint_id, job.subpath, job.mode, json.dumps(job.input), job.seed, job.priority,
        job.webhook_url, job.start_timeout, job.runner_hint, job.owner, job.files_ttl, job.status.value,
        job.attempts, job.created_at, job.started_at, job.finished_at, job.inference_time, json.dumps(job.logs),
        job.result, json.dumps(job.error.to_record()) if job.error else None,
    )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], endpoint_id=row["endpoint"], subpath=row["subpath"], mode=row["mode"],
        input=json.loads(row["input"]), seed=row["seed"], priority=row["priority"],
        webhook_url=row["webhook_url"], start_timeout=row["start_timeout"], runner_hint=row["runner_hint"],
        owner=row["owner"], files_ttl=row["files_ttl"],
        status=Status(row["status"]), attempts=row["attempts"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], inference_time=row["inference_time"],
        logs=json.loads(row["logs"]), result=row["result"],
        error=ApiError.from_record(json.loads(row["error"])) if row["error"] else None,
    )


class JobStore:
    """Jobs by id; every state change goes through one of the transition methods below."""

    def __init__(self, db: Database, owns_db: bool = False) -> None:
        self.db = db
        self._owns_db = owns_db
        self.active: dict[str, Job] = {}
        self._recent: OrderedDict[str, Job] = OrderedDict()
        self._recent_bytes = 0
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._changes: dict[str, asyncio.Event] = {}

    @classmethod
    async def open(cls, path: Path, db: Database | None = None) -> JobStore:
        """The store over `db` (shared with the other stores), or over its own database at `path`."""
        owns = db is None
        database = db or await Database.open(path)
        await database.migrate(_SCHEMA, _ADDED_COLUMNS)
        return cls(database, owns_db=owns)

    async def _db(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return await self.db.execute(sql, params)

    async def _write(self, job: Job) -> bool:
        """Writes the job unless the database already holds it COMPLETED; True if written."""
        (count,) = await self.db.transaction([(_UPSERT, _row(job))])
        return count > 0

    async def close(self) -> None:
        if self._owns_db:
            await self.db.close()

    # -- reading -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        job = self.active.get(job_id) or self._recent.get(job_id)
        if job is not None:
            return job
        rows = await self._db(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = _job(rows[0])
        if job.status is Status.COMPLETED:
            self._remember(job)
        return job

    async def load_unfinished(self) -> list[Job]:
        """Jobs a previous process left unfinished, oldest first; they become active here."""
        rows = await self._db(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status != 'COMPLETED' ORDER BY created_at"
        )
        jobs = [_job(r) for r in rows]
        for job in jobs:
            self.active[job.id] = job
        return jobs

    async def wait(self, job: Job) -> Job:
        """Returns when `job` is COMPLETED."""
        if job.status is Status.COMPLETED:
            return job
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job.id, []).append(future)
        try:
            return await future
        finally:
            waiters = self._waiters.get(job.id)
            if waiters and future in waiters:
                waiters.remove(future)

    def change_event(self, job_id: str) -> asyncio.Event:
        """Set at the job's next change (a log line, progress, a state change). Take the event first,
        then read the job, then wait: a change in between is not missed."""
        event = self._changes.get(job_id)
        if event is None:
            event = self._changes[job_id] = asyncio.Event()
        return event

    def _changed(self, job: Job) -> None:
        event = self._changes.pop(job.id, None)
        if event is not None:
            event.set()

    # -- transitions -------------------------------------------------------------------------------

    async def add(self, job: Job) -> None:
        """Persist a new IN_QUEUE job; returns once it is committed."""
        await self._write(job)
        self.active[job.id] = job
        log.info("job %s %s IN_QUEUE (%s, priority %s, seed %d)", job.id, job.endpoint_id, job.mode,
                 job.priority, job.seed)

    async def start(self, job: Job) -> None:
        job.status = Status.IN_PROGRESS
        job.attempts += 1
        job.started_at = time.time()
        job.steps.clear()
        if job.attempts > 1:
            self.log(job, f"attempt {job.attempts}")
        await self._write(job)
        self._changed(job)
        log.info("job %s IN_PROGRESS (attempt %d)", job.id, job.attempts)

    def log(self, job: Job, message: str, level: str = "INFO") -> None:
        job.logs.append(log_entry(message, level))
        self._changed(job)

    def progress(self, job: Job, step: int, total: int) -> None:
        self.log(job, f"step {step}/{total}")
        job.steps.append((len(job.logs), step, total))  # before the stream, woken by log(), next runs

    async def requeue(self, job: Job, reason: str, count_attempt: bool = True) -> None:
        job.status = Status.IN_QUEUE
        job.started_at = None
        job.steps.clear()
        if not count_attempt:
            job.attempts = max(0, job.attempts - 1)
        self.log(job, f"back in the queue: {reason}", "WARN")
        await self._write(job)
        log.info("job %s IN_QUEUE again: %s", job.id, reason)

    async def finish(
        self, job: Job, *, result: str | None = None, error: ApiError | None = None,
    ) -> bool:
        """COMPLETED with the output JSON text, or with an error. Once only: False (and nothing
        written) when the job is already COMPLETED, here or in the database."""
        if job.status is Status.COMPLETED:
            log.warning("job %s is already COMPLETED; a second result was dropped", job.id)
            return False
        job.status = Status.COMPLETED
        job.finished_at = time.time()
        if job.started_at is not None:
            job.inference_time = job.finished_at - job.started_at
        job.result = result
        job.error = error
        if error is not None:
            job.logs.append(log_entry(f"{error.error_type.value}: {error.message}", "ERROR"))
        statements: list[Statement] = [(_UPSERT, _row(job))]
        if job.webhook_url and job.mode == "queue":
            statements.append((_NEW_DELIVERY, (job.id, job.webhook_url, job.finished_at)))
        written, *_ = await self.db.transaction(statements)
        self.active.pop(job.id, None)
        if not written:
            log.warning("job %s was already COMPLETED in the database; kept that result", job.id)
            stored = await self._db(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job.id,))
            if stored:
                kept = _job(stored[0])
                job.result, job.error, job.finished_at = kept.result, kept.error, kept.finished_at
        self._remember(job)
        self._changed(job)
        for future in self._waiters.pop(job.id, []):
            if not future.done():
                future.set_result(job)
        if not written:
            return False
        if error is None:
            log.info("job %s COMPLETED in %.2fs", job.id, job.inference_time or 0.0)
        else:
            log.info("job %s COMPLETED with %d %s: %s", job.id, error.status_code, error.error_type.value,
                     error.message)
        return True

    def _remember(self, job: Job) -> None:
        size = len(job.result or "")
        if job.id in self._recent or size > RECENT_BYTES // 4:
            return
        self._recent[job.id] = job
        self._recent_bytes += size
        while len(self._recent) > RECENT_JOBS or self._recent_bytes > RECENT_BYTES:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old.result or "")
