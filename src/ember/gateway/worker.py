"""The worker pool: takes jobs in queue order and runs each one through its endpoint and the backend.

One job, in order:
1. IN_PROGRESS (attempt n); the endpoint's notes become the first log lines.
2. endpoint.to_triton(input, seed) -> backend.generate(): each Progress becomes a log "step i/n".
3. Final -> endpoint.to_output(..., store=files), images stored as files or data URIs.
4. COMPLETED with the output JSON, or with an error from the table in errors.py.

Backend "unavailable" errors are retried (at the head of the queue, after a back-off) up to
`max_attempts`, then the job fails 503 runner_scheduling_failure. A cancelled job's backend stream is
closed, which cancels the Triton request. On shutdown (`drain`) running jobs get a grace period, then
queued ones go back to IN_QUEUE for the next start; nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from contextlib import aclosing
from typing import Literal

from pydantic import ValidationError

from ember.endpoints.common import InputError
from ember.endpoints.registry import ENDPOINTS
from ember.gateway.backend import Backend, BackendError, Final, Progress
from ember.gateway.errors import ApiError, ErrorType, from_input_error, from_pydantic
from ember.gateway.files import FileStore
from ember.gateway.jobs import Job, JobStore, Priority, Status

log = logging.getLogger(__name__)

PRIORITIES: tuple[Priority, ...] = ("normal", "low")
CancelOutcome = Literal["requested", "already_completed"]


class JobQueue:
    """Job ids waiting to run: one FIFO lane per priority, `normal` before `low`."""

    def __init__(self) -> None:
        self._lanes: dict[Priority, deque[str]] = {p: deque() for p in PRIORITIES}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def push(self, job_id: str, priority: Priority, front: bool = False) -> None:
        lane = self._lanes[priority]
        lane.appendleft(job_id) if front else lane.append(job_id)
        self._ready.set()

    def remove(self, job_id: str) -> bool:
        for lane in self._lanes.values():
            try:
                lane.remove(job_id)
            except ValueError:
                continue
            return True
        return False

    def position(self, job_id: str) -> int | None:
        """How many jobs run before this one (fal's `queue_position`, 0 = next)."""
        ahead = 0
        for lane in self._lanes.values():
            try:
                return ahead + lane.index(job_id)
            except ValueError:
                ahead += len(lane)
        return None

    async def pop(self) -> str:
        while True:
            for lane in self._lanes.values():
                if lane:
                    return lane.popleft()
            self._ready.clear()
            await self._ready.wait()


class Worker:
    def __init__(
        self, store: JobStore, backend: Backend, files: FileStore, concurrency: int, *,
        max_attempts: int = 3, retry_delay: float = 1.0,
    ) -> None:
        self.store = store
        self.backend = backend
        self.files = files
        self.queue = JobQueue()
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_reason: dict[str, Literal["user", "shutdown"]] = {}
        self._delayed: dict[str, asyncio.TimerHandle] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._draining = False

    # -- scheduling --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="ember-dispatcher")

    def enqueue(self, job: Job, front: bool = False) -> None:
        self.queue.push(job.id, job.priority, front)

    def position(self, job: Job) -> int:
        position = self.queue.position(job.id)
        return 0 if position is None else position

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running(self) -> int:
        return len(self._running)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                job_id = await self.queue.pop()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            job = self.store.active.get(job_id)
            if job is None or job.status is not Status.IN_QUEUE:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            self._running[job.id] = task
            task.add_done_callback(functools.partial(self._done, job.id))

    def _done(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._slots.release()

    # -- one job -----------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        endpoint = ENDPOINTS[job.endpoint_id]
        try:
            await self.store.start(job)
            inp = endpoint.input_model.model_validate(job.input)
            for note in endpoint.notes(inp):
                self.store.log(job, note)
            tensors = endpoint.to_triton(inp, job.seed)
            final: Final | None = None
            async with aclosing(self.backend.generate(endpoint.triton_model, tensors, job.id)) as events:
                async for event in events:
                    if isinstance(event, Progress):
                        self.store.log(job, f"step {event.step}/{event.total}")
                    else:
                        final = event
                        break
            if final is None:
                raise BackendError("internal", f"{endpoint.triton_model}: no result")
            output = await endpoint.to_output(inp, job.seed, final.outputs, self.files.sink(endpoint.sync_mode(inp)))
            result = output.model_dump_json()
        except asyncio.CancelledError:
            await self._cancelled(job)
            raise
        except InputError as exc:
            await self.store.finish(job, error=from_input_error(exc))
        except ValidationError as exc:
            # The stored input validated at submit; only a schema change between restarts gets here.
            log.warning("job %s: stored input no longer validates: %s", job.id, exc)
            await self.store.finish(job, error=from_pydantic(exc))
        except BackendError as exc:
            await self._backend_failed(job, exc)
        except Exception:
            log.exception("job %s failed", job.id)
            await self.store.finish(job, error=ApiError(
                ErrorType.INTERNAL, f"internal error while running request {job.id} (details in the server log)"))
        else:
            await self.store.finish(job, result=result)

    async def _backend_failed(self, job: Job, exc: BackendError) -> None:
        if exc.retryable and self._draining and job.mode == "queue":
            await self.store.requeue(job, f"inference server unavailable ({exc.message}) while stopping",
                                     count_attempt=False)
            return
        if exc.retryable and job.attempts < self.max_attempts and not self._draining:
            await self.store.requeue(job, f"inference server unavailable ({exc.message}); retrying")
            delay = self.retry_delay * 2 ** (job.attempts - 1)
            loop = asyncio.get_running_loop()
            self._delayed[job.id] = loop.call_later(delay, self._retry, job)
            return
        if exc.kind == "unavailable":
            # The reason names internal addresses: it goes to the log, not to the caller.
            log.warning("job %s: inference server unavailable: %s", job.id, exc.message)
            error = ApiError(ErrorType.RUNNER_SCHEDULING_FAILURE,
                             f"the inference server is unavailable (tried {job.attempts} time(s))")
        elif exc.kind == "invalid":
            error = ApiError.validation([{"loc": ["body"], "msg": exc.message, "type": "value_error"}])
        elif exc.kind == "cancelled":
            error = ApiError(ErrorType.RUNNER_DISCONNECTED, f"the inference server cancelled the request: {exc.message}")
        else:
            error = ApiError(ErrorType.INTERNAL, f"the model failed: {exc.message}")
        await self.store.finish(job, error=error)

    def _retry(self, job: Job) -> None:
        self._delayed.pop(job.id, None)
        if job.status is Status.IN_QUEUE:
            self.enqueue(job, front=True)

    async def _cancelled(self, job: Job) -> None:
        reason = self._cancel_reason.pop(job.id, "shutdown")
        if reason == "user":
            await self.store.finish(job, error=ApiError(ErrorType.REQUEST_CANCELLED, "Request was cancelled"))
        elif job.mode == "run":
            await self.store.finish(job, error=ApiError(ErrorType.RUNNER_DISCONNECTED, "the server is shutting down"))
        else:
            await self.store.requeue(job, "the server is shutting down", count_attempt=False)

    # -- cancel and shutdown -----------------------------------------------------------------------

    async def cancel(self, job: Job) -> CancelOutcome:
        """fal's cancel: a queued job is removed, a running one's backend stream is closed."""
        if job.status is Status.COMPLETED:
            return "already_completed"
        task = self._running.get(job.id)
        if task is not None:
            self._cancel_reason[job.id] = "user"
            task.cancel()
            return "requested"
        self.queue.remove(job.id)
        timer = self._delayed.pop(job.id, None)
        if timer is not None:
            timer.cancel()
        await self.store.finish(job, error=ApiError(ErrorType.REQUEST_CANCELLED, "Request was cancelled"))
        return "requested"

    async def recover(self) -> int:
        """Re-queue what a previous process left unfinished: IN_QUEUE as it was, IN_PROGRESS to run
        again while attempts remain. A sync run's caller is gone, so its job is closed instead."""
        requeued = 0
        for job in await self.store.load_unfinished():
            if job.mode == "run":
                await self.store.finish(job, error=ApiError(
                    ErrorType.RUNNER_DISCONNECTED, "the server restarted before this request finished"))
            elif job.status is Status.IN_PROGRESS and job.attempts >= self.max_attempts:
                await self.store.finish(job, error=ApiError(
                    ErrorType.RUNNER_DISCONNECTED,
                    f"the server stopped during each of {job.attempts} attempts at this request"))
            else:
                if job.status is Status.IN_PROGRESS:
                    await self.store.requeue(job, "the server restarted while it ran")
                self.enqueue(job)
                requeued += 1
        if requeued:
            log.info("recovered %d unfinished job(s)", requeued)
        return requeued

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs; give running ones `timeout` seconds, then put them back in the queue.

        Queued jobs stay IN_QUEUE in the database for the next start; sync runs still waiting fail
        503 now, since their callers would otherwise wait on a server that is going away.
        """
        if self._draining:
            return
        self._draining = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for timer in self._delayed.values():
            timer.cancel()
        self._delayed.clear()
        for job in list(self.store.active.values()):
            if job.mode == "run" and job.status is Status.IN_QUEUE and self.queue.remove(job.id):
                await self.store.finish(job, error=ApiError(
                    ErrorType.RUNNER_DISCONNECTED, "the server is shutting down"))
        tasks = list(self._running.values())
        if tasks:
            log.info("waiting up to %.0fs for %d running job(s)", timeout, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for job_id, task in list(self._running.items()):
                if task in pending:
                    self._cancel_reason[job_id] = "shutdown"
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
