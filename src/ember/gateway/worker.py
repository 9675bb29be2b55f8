"""The worker pool: takes jobs in queue order and runs each one through its endpoint and the backend.

One job, in order (`execute`, which the realtime sessions share):
1. IN_PROGRESS (attempt n); on the first attempt the endpoint's notes become the first log lines.
2. endpoint.load(input, media): URL inputs fetched and decoded (422 at the field on failure).
3. endpoint.to_triton(input, seed, loaded) -> backend.generate(): each Progress is a log "step i/n".
4. Final -> endpoint.to_output(..., store=files.sink(...)), images and other files stored as files or data URIs.
5. COMPLETED with the output JSON, or with an error from the table in errors.py.

Backend "unavailable" errors are retried (at the head of the queue, after a back-off) up to
`max_attempts`, then the job fails 503 runner_scheduling_failure. A job whose X-Fal-Request-Timeout
passes before it first starts fails 504 with `x-fal-request-timeout-type: user`. A cancelled job's
backend stream is closed, which cancels the Triton request. On shutdown (`drain`) running jobs get a
grace period, then go back to IN_QUEUE for the next start; nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from ember.endpoints.base import Endpoint, ImageSink, MediaLoader
from ember.endpoints.common import InputError
from ember.endpoints.registry import ENDPOINTS
from ember.gateway.backend import Backend, BackendError, Final, Log, Progress
from ember.gateway.errors import ApiError, ErrorType, from_input_error, from_pydantic
from ember.gateway.files import FileStore
from ember.gateway.jobs import Job, JobStore, Priority, Status
from ember.gateway.metrics import Metrics

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

    def depth(self, priority: str) -> int:
        return len(self._lanes.get(priority, ()))  # type: ignore[call-overload]

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


async def execute(
    endpoint: Endpoint[Any], inp: BaseModel, seed: int, request_id: str, backend: Backend, media: MediaLoader,
    sink: ImageSink, on_progress: Callable[[int, int], None], on_log: Callable[[str], None] | None = None,
) -> BaseModel:
    """One request through its endpoint and the backend: load URL inputs, translate, stream the
    model's progress, translate the final tensors back. Raises InputError, BackendError, or
    CancelledError (the Triton request is cancelled with the stream)."""
    loaded = await endpoint.load(inp, media)
    tensors = endpoint.to_triton(inp, seed, loaded)
    final: Final | None = None
    async with aclosing(backend.generate(endpoint.triton_model, tensors, request_id)) as events:
        async for event in events:
            if isinstance(event, Progress):
                on_progress(event.step, event.total)
            elif isinstance(event, Log):
                if on_log is not None:
                    on_log(event.message)
            else:
                final = event
                break
    if final is None:
        raise BackendError("internal", f"{endpoint.triton_model}: no result")
    return await endpoint.to_output(inp, seed, final.outputs, sink)


def backend_error(exc: BackendError, attempts: int) -> ApiError:
    """The answer for a backend failure that is not retried (again)."""
    if exc.kind == "unavailable":
        return ApiError(ErrorType.RUNNER_SCHEDULING_FAILURE,
                        f"the inference server is unavailable (tried {attempts} time(s))")
    if exc.kind == "invalid":
        return ApiError.validation([{"loc": ["body"], "msg": exc.message, "type": "value_error"}])
    if exc.kind == "cancelled":
        return ApiError(ErrorType.RUNNER_DISCONNECTED, f"the inference server cancelled the request: {exc.message}")
    return ApiError(ErrorType.INTERNAL, f"the model failed: {exc.message}")


class Worker:
    def __init__(
        self, store: JobStore, backend: Backend, files: FileStore, media: MediaLoader, concurrency: int, *,
        max_attempts: int = 3, retry_delay: float = 1.0, metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.files = files
        self.media = media
        self.queue = JobQueue()
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.metrics = metrics or Metrics()
        self.metrics.track_queue(self.queue.depth, PRIORITIES)
        self.metrics.jobs_running.set_function(lambda: len(self._running))
        # Called with each job that reaches COMPLETED (the webhook sender listens here).
        self.on_finished: list[Callable[[Job], None]] = []
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_reason: dict[str, Literal["user", "shutdown"]] = {}
        self._delayed: dict[str, asyncio.TimerHandle] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._draining = False

    # -- scheduling --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="ember-dispatcher")

    def enqueue(self, job: Job, front: bool = False) -> None:
        self.queue.push(job.id, job.priority, front)
        deadline = job.start_deadline
        if deadline is not None and job.id not in self._deadlines:
            delay = max(0.0, deadline - time.time())
            self._deadlines[job.id] = asyncio.get_running_loop().call_later(delay, self._start_expired, job)

    def position(self, job: Job) -> int:
        position = self.queue.position(job.id)
        return 0 if position is None else position

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running(self) -> int:
        return len(self._running)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_expired(self, job: Job) -> None:
        self._deadlines.pop(job.id, None)
        if job.status is Status.IN_QUEUE and job.attempts == 0 and self.queue.remove(job.id):
            self._spawn(self._finish(job, error=ApiError.start_timeout(job.start_timeout or 0.0)))

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
            timer = self._deadlines.pop(job.id, None)
            if timer is not None:
                timer.cancel()
            deadline = job.start_deadline
            if deadline is not None and time.time() > deadline:
                self._slots.release()
                await self._finish(job, error=ApiError.start_timeout(job.start_timeout or 0.0))
                continue
            task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            self._running[job.id] = task
            task.add_done_callback(functools.partial(self._done, job.id))

    def _done(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._slots.release()

    async def _finish(self, job: Job, *, result: str | None = None, error: ApiError | None = None) -> None:
        if not await self.store.finish(job, result=result, error=error):
            return
        status = str(error.status_code) if error is not None else "200"
        self.metrics.job_latency.labels(job.endpoint_id, job.mode, status).observe(
            (job.finished_at or time.time()) - job.created_at)
        for callback in self.on_finished:
            callback(job)

    # -- one job -----------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        endpoint = ENDPOINTS[job.endpoint_id]
        first = job.attempts == 0
        try:
            await self.store.start(job)
            if first:
                self.metrics.queue_wait.labels(job.endpoint_id).observe(max(0.0, time.time() - job.created_at))
            inp = endpoint.input_model.model_validate(job.input)
            if first:
                for note in endpoint.notes(inp):
                    self.store.log(job, note)
            sink = self.files.sink(endpoint.sync_mode(inp), ttl=job.files_ttl)
            output = await execute(endpoint, inp, job.seed, job.id, self.backend, self.media, sink,
                                   functools.partial(self.store.progress, job),
                                   functools.partial(self.store.log, job))
            result = output.model_dump_json()
        except asyncio.CancelledError:
            await self._cancelled(job)
            raise
        except InputError as exc:
            await self._finish(job, error=from_input_error(exc))
        except ValidationError as exc:
            # The stored input validated at submit; only a schema change between restarts gets here.
            log.warning("job %s: stored input no longer validates (%d errors)", job.id, exc.error_count())
            await self._finish(job, error=from_pydantic(exc))
        except BackendError as exc:
            await self._backend_failed(job, exc)
        except Exception:
            log.exception("job %s failed", job.id)
            await self._finish(job, error=ApiError(
                ErrorType.INTERNAL, f"internal error while running request {job.id} (details in the server log)"))
        else:
            await self._finish(job, result=result)

    async def _backend_failed(self, job: Job, exc: BackendError) -> None:
        if exc.retryable and self._draining and job.mode == "queue":
            await self.store.requeue(job, f"inference server unavailable ({exc.message}) while stopping",
                                     count_attempt=False)
            return
        if exc.retryable and job.attempts < self.max_attempts and not self._draining:
            delay = self.retry_delay * 2 ** (job.attempts - 1)
            # The reason names internal addresses: the log gets it, the job's logs a summary.
            log.warning("job %s: inference server unavailable (%s); retry in %.1fs", job.id, exc.message, delay)
            self.metrics.job_retries.labels(job.endpoint_id, "backend_unavailable").inc()
            await self.store.requeue(job, f"the inference server is unavailable; retrying in {delay:g} s "
                                     f"(attempt {job.attempts} of {self.max_attempts})")
            loop = asyncio.get_running_loop()
            self._delayed[job.id] = loop.call_later(delay, self._retry, job)
            return
        if exc.kind == "unavailable":
            log.warning("job %s: inference server unavailable: %s", job.id, exc.message)
        await self._finish(job, error=backend_error(exc, job.attempts))

    def _retry(self, job: Job) -> None:
        self._delayed.pop(job.id, None)
        if job.status is Status.IN_QUEUE:
            self.enqueue(job, front=True)

    async def _cancelled(self, job: Job) -> None:
        reason = self._cancel_reason.pop(job.id, "shutdown")
        if reason == "user":
            await self._finish(job, error=ApiError(ErrorType.REQUEST_CANCELLED, "Request was cancelled"))
        elif job.mode == "run":
            await self._finish(job, error=ApiError(ErrorType.RUNNER_DISCONNECTED, "the server is shutting down"))
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
        for timers in (self._delayed, self._deadlines):
            timer = timers.pop(job.id, None)
            if timer is not None:
                timer.cancel()
        await self._finish(job, error=ApiError(ErrorType.REQUEST_CANCELLED, "Request was cancelled"))
        return "requested"

    def cancel_soon(self, job: Job) -> None:
        """`cancel` from a context that cannot await (a stream whose caller went away)."""
        if job.status is not Status.COMPLETED:
            self._spawn(self.cancel(job))

    async def recover(self) -> int:
        """Re-queue what a previous process left unfinished: IN_QUEUE as it was, IN_PROGRESS to run
        again while attempts remain. A sync run's caller is gone, so its job is closed instead."""
        requeued = 0
        for job in await self.store.load_unfinished():
            if job.mode == "run":
                await self._finish(job, error=ApiError(
                    ErrorType.RUNNER_DISCONNECTED, "the server restarted before this request finished"))
            elif job.status is Status.IN_PROGRESS and job.attempts >= self.max_attempts:
                await self._finish(job, error=ApiError(
                    ErrorType.RUNNER_DISCONNECTED,
                    f"the server stopped during each of {job.attempts} attempts at this request"))
            else:
                if job.status is Status.IN_PROGRESS:
                    self.metrics.job_retries.labels(job.endpoint_id, "gateway_restart").inc()
                    await self.store.requeue(job, f"the server restarted while it ran (attempt {job.attempts} "
                                             f"of {self.max_attempts})")
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
        for timers in (self._delayed, self._deadlines):
            for timer in timers.values():
                timer.cancel()
            timers.clear()
        for job in list(self.store.active.values()):
            if job.mode == "run" and job.status is Status.IN_QUEUE and self.queue.remove(job.id):
                await self._finish(job, error=ApiError(ErrorType.RUNNER_DISCONNECTED, "the server is shutting down"))
        tasks = list(self._running.values())
        if tasks:
            log.info("waiting up to %.0fs for %d running job(s)", timeout, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for job_id, task in list(self._running.items()):
                if task in pending:
                    self._cancel_reason[job_id] = "shutdown"
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
