"""What the three listeners share: settings, backend, keys, jobs, files and the worker pool."""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ember.endpoints.base import Endpoint
from ember.gateway.auth import KeyStore
from ember.gateway.backend import Backend
from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.files import FileStore
from ember.gateway.jobs import Job, JobStore, Mode, Priority
from ember.gateway.worker import Worker
from ember.settings import Settings

log = logging.getLogger(__name__)

# Random seeds stay below 2**32: JS clients read JSON numbers as doubles (exact only below 2**53),
# and fal's own random seeds are of this size.
RANDOM_SEED_BOUND = 2**32


def base_url(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}" if port == 443 else f"https://{host}:{port}"


@dataclass(frozen=True)
class ValidRequest:
    """A run or submit request that passed the endpoint's schema and checks."""

    endpoint: Endpoint[Any]
    subpath: str
    input: BaseModel
    # The JSON object as sent: what the job stores and re-validates when it runs.
    data: dict[str, Any]


@dataclass(frozen=True)
class SubmitOptions:
    """What a run or submit asks for besides its input (fal-protocol.md §3.1, §5.1)."""

    webhook_url: str | None = None
    priority: Priority = "normal"
    start_timeout: float | None = None
    runner_hint: str | None = None


class GatewayState:
    def __init__(
        self, settings: Settings, backend: Backend, keys: KeyStore, jobs: JobStore, files: FileStore,
        worker: Worker,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.keys = keys
        self.jobs = jobs
        self.files = files
        self.worker = worker
        self.run_base = base_url(settings.public_host, settings.run_port)
        self.queue_base = base_url(settings.public_host, settings.queue_port)

    @classmethod
    async def open(
        cls, settings: Settings, backend: Backend, *, start_worker: bool = True, max_attempts: int = 3,
        retry_delay: float = 1.0,
    ) -> GatewayState:
        """Open the stores, re-queue unfinished jobs and (unless told not to) start the workers.

        `start_worker=False` accepts and persists jobs without running them (tests, a read-only
        replica)."""
        keys = KeyStore.from_settings(settings)
        jobs = await JobStore.open(settings.db_path)
        files = FileStore(settings.files_dir, base_url(settings.public_host, settings.run_port))
        worker = Worker(jobs, backend, files, settings.worker_concurrency,
                        max_attempts=max_attempts, retry_delay=retry_delay)
        await worker.recover()
        if start_worker:
            worker.start()
        return cls(settings, backend, keys, jobs, files, worker)

    def request_urls(self, job: Job) -> dict[str, str]:
        """Absolute https URLs on the queue host at `{app}` level (fal-protocol.md §5.1)."""
        response_url = f"{self.queue_base}/{job.app}/requests/{job.id}"
        return {"response_url": response_url, "status_url": f"{response_url}/status",
                "cancel_url": f"{response_url}/cancel"}

    async def submit(self, request: ValidRequest, mode: Mode, options: SubmitOptions) -> Job:
        """Persist a validated request as a job and queue it; returns once it is durably stored.

        The seed is fixed here (the input's, else a random one), so a re-run after a restart or a
        retry renders the same images."""
        if mode == "run" and self.worker.draining:
            # Nobody would run it before the process exits; a queued job would wait for the next start.
            raise ApiError(ErrorType.RUNNER_DISCONNECTED, "the server is shutting down")
        seed = request.endpoint.seed_of(request.input)
        job = Job(
            id=str(uuid.uuid4()), endpoint_id=request.endpoint.endpoint_id, subpath=request.subpath, mode=mode,
            input=request.data, seed=secrets.randbelow(RANDOM_SEED_BOUND) if seed is None else seed,
            priority=options.priority, webhook_url=options.webhook_url, start_timeout=options.start_timeout,
            runner_hint=options.runner_hint,
        )
        await self.jobs.add(job)
        self.worker.enqueue(job)
        return job

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Drain the workers (see Worker.drain; a second drain is a no-op), then close the stores
        and the backend."""
        await self.worker.drain(drain_timeout)
        await self.jobs.close()
        self.files.close()
        await self.backend.close()
