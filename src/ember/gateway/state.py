"""What the four listeners share: settings, backend, keys, the database (jobs, webhook deliveries,
file records), files, the fetcher, the worker pool, the webhook sender and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ember.endpoints.base import Endpoint
from ember.gateway.auth import KeyStore
from ember.gateway.backend import Backend
from ember.gateway.checkpoints import SUBDIR as CHECKPOINTS
from ember.gateway.checkpoints import CheckpointCache
from ember.gateway.db import Database
from ember.gateway.errors import ApiError, ErrorType
from ember.gateway.fetcher import Fetcher, FetchPolicy
from ember.gateway.files import FileStore
from ember.gateway.inputs import GatewayMedia
from ember.gateway.jobs import Job, JobStore, Mode, Priority
from ember.gateway.metrics import Metrics
from ember.gateway.tokens import Signer
from ember.gateway.webhooks import WebhookKey, WebhookSender
from ember.gateway.worker import Worker
from ember.settings import Settings

log = logging.getLogger(__name__)

# Random seeds stay below 2**32: JS clients read JSON numbers as doubles (exact only below 2**53),
# and fal's own random seeds are of this size.
RANDOM_SEED_BOUND = 2**32
SWEEP_INTERVAL_S = 30.0


def base_url(host: str, port: int, scheme: str = "https") -> str:
    host = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" if port == default else f"{scheme}://{host}:{port}"


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
    # X-Fal-Object-Lifecycle-Preference: output files expire this many seconds after they are written.
    files_ttl: float | None = None
    owner: str = ""


class GatewayState:
    def __init__(
        self, settings: Settings, backend: Backend, keys: KeyStore, db: Database, jobs: JobStore,
        files: FileStore, fetcher: Fetcher, media: GatewayMedia, worker: Worker, webhooks: WebhookSender,
        signer: Signer, webhook_key: WebhookKey, metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.keys = keys
        self.db = db
        self.jobs = jobs
        self.files = files
        self.fetcher = fetcher
        self.media = media
        self.worker = worker
        self.webhooks = webhooks
        self.signer = signer
        self.webhook_key = webhook_key
        self.metrics = metrics
        self.run_base = base_url(settings.public_host, settings.run_port)
        self.queue_base = base_url(settings.public_host, settings.queue_port)
        self.rest_base = base_url(settings.public_host, settings.rest_port)
        self.http_base = base_url(settings.public_host, settings.http_port, "http")
        # Set when shutdown starts: /ready answers 503 from then on (load balancers stop sending).
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, settings: Settings, backend: Backend, *, start_worker: bool = True, max_attempts: int | None = None,
        retry_delay: float | None = None,
    ) -> GatewayState:
        """Open the stores, re-queue unfinished jobs and (unless told not to) start the workers and the
        webhook sender. `start_worker=False` accepts and persists jobs without running them (tests, a
        read-only replica); `max_attempts` / `retry_delay` override the settings (tests)."""
        keys = KeyStore.from_settings(settings)
        db = await Database.open(settings.db_path)
        jobs = await JobStore.open(settings.db_path, db=db)
        run_base = base_url(settings.public_host, settings.run_port)
        files = FileStore(settings.files_dir, run_base, db)
        await files.load()
        fetcher = Fetcher(FetchPolicy(max_bytes=settings.fetch_max_bytes, timeout_s=settings.fetch_timeout,
                                      allow=settings.fetch_allow))
        own = (run_base, base_url(settings.public_host, settings.rest_port),
               base_url(settings.public_host, settings.http_port, "http"))
        # fal-ai/lora model_name URLs: streamed into the model root that Triton reads (ember.gateway.checkpoints)
        checkpoints = CheckpointCache(fetcher, files, (settings.lora_models_dir / CHECKPOINTS).resolve(),
                                      max_bytes=settings.checkpoint_max_bytes, timeout_s=settings.checkpoint_timeout)
        media = GatewayMedia(fetcher, files, own, max_image_bytes=settings.fetch_max_bytes,
                             max_weights_bytes=settings.weights_max_bytes, checkpoints=checkpoints)
        metrics = Metrics()
        worker = Worker(jobs, backend, files, media, settings.worker_concurrency,
                        max_attempts=settings.max_attempts if max_attempts is None else max_attempts,
                        retry_delay=settings.retry_delay if retry_delay is None else retry_delay, metrics=metrics)
        signer = Signer.from_file(settings.keys_dir / "signing-secret")
        webhook_key = WebhookKey.from_file(settings.keys_dir / "webhook-ed25519.pem")
        webhooks = WebhookSender(db, jobs, fetcher, webhook_key, metrics, attempts=settings.webhook_attempts,
                                 timeout=settings.webhook_timeout, retry_delay=settings.webhook_retry_delay)
        worker.on_finished.append(webhooks.wake)
        state = cls(settings, backend, keys, db, jobs, files, fetcher, media, worker, webhooks, signer,
                    webhook_key, metrics)
        await worker.recover()
        if start_worker:
            worker.start()
            await webhooks.start()
            state._sweeper = asyncio.create_task(state._sweep_files(), name="ember-file-sweeper")
        return state

    async def _sweep_files(self) -> None:
        while True:
            try:
                await self.files.sweep()
            except Exception:
                log.exception("file sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL_S)

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
            priority=options.priority, webhook_url=options.webhook_url if mode == "queue" else None,
            start_timeout=options.start_timeout, runner_hint=options.runner_hint, owner=options.owner,
            files_ttl=options.files_ttl,
        )
        await self.jobs.add(job)
        self.worker.enqueue(job)
        return job

    async def close(self, drain_timeout: float | None = None) -> None:
        """Drain the workers (see Worker.drain; a second drain is a no-op), stop the webhook sender
        (pending deliveries stay in the database), then close the stores and the backend."""
        if self._closed:
            return
        self._closed = True
        self.stopping = True
        await self.worker.drain(self.settings.drain_timeout if drain_timeout is None else drain_timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.webhooks.close()
        await self.fetcher.close()
        await self.jobs.close()
        await self.db.close()
        self.files.close()
        await self.backend.close()
