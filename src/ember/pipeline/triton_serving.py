"""The execute() loop every decoupled endpoint model shares: pb_utils tensors in, pipeline, responses out.

Per request: LOG responses while the pipeline loads what the request names (models that stream them),
responses carrying PROGRESS [step, total] (the first and last denoising steps, and the others at most one
per `progress_every_s`), then one carrying the result tensors with the FINAL flag. Every response leaves through
the model's Outbox thread, so the denoising loop never waits on Triton's IPC. A bad request (or one its
pipeline refuses on its own: `result.error`) is answered with an INVALID_ARG error, a cancelled one with a
CANCELLED error (both FINAL); neither disturbs the others in the batch.

`pb_utils` is passed in: it exists only inside Triton's Python stub, and this module must import in tests.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EndpointModel:
    """What differs between endpoint models; `execute` is the same for all of them."""

    name: str
    input_names: Sequence[str]
    parse: Callable[[dict[str, np.ndarray | None], Any, Callable[[], bool]], Any]
    check: Callable[[Any], list[str]]
    pipeline: Callable[..., list[Any]]  # (items, on_step[, on_log]) -> one result per item
    progress_arrays: Callable[[int, int], dict[str, np.ndarray]]
    result_arrays: Callable[[Any], dict[str, np.ndarray]]
    defaults: Any
    # Models that stream log lines (fal-ai/lora: base-model loading): the pipeline is then called with
    # on_log(index, message), each message sent as a LOG response and written to Triton's log.
    log_arrays: Callable[[str], dict[str, np.ndarray]] | None = None
    # A line for Triton's log about a result, or None (fal-ai/lcm: a negative_prompt it ignored).
    result_note: Callable[[Any], str | None] | None = None
    # Progress responses at most one per this many seconds besides a request's first and last step
    # (Settings.progress_interval_ms). Every response crosses the stub's IPC, the server's gRPC stream and
    # the client: on the 2-core CPU demo one per step cost the Triton path ~1.7 ms per step in all
    # (sote_diffusion 512 px, 35 steps: Triton 1.25x the in-process time with one per step, 1.035x with none).
    progress_every_s: float = 0.0
    outbox: Outbox = field(default_factory=lambda: Outbox())


class Outbox:
    """Sends a model's decoupled responses from one background thread, in the order they were queued.

    `InferenceResponseSender.send` is a blocking round trip to the Triton server (shared-memory IPC): about 1 ms
    per response measured on the CPU demo. Queued here, progress responses leave while the next step computes
    (the pattern of Triton's vLLM backend, which sends from a separate thread), so on a GPU host with spare
    cores the denoising loop never stalls its kernel launches on IPC. On the 2-core CPU demo it gains nothing
    measurable (the cores are busy either way; fewer responses is what helps there: `progress_every_s`).
    One queue per model keeps every request's responses in order: progress, then its result or error with
    the FINAL flag."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, Any, Any, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, pb_utils: Any, sender: Any, response: Any, flags: int = 0) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ember-responses", daemon=True)
                    self._thread.start()
        self._queue.put((pb_utils, sender, response, flags))

    def _run(self) -> None:
        while True:
            pb_utils, sender, response, flags = self._queue.get()
            try:
                sender.send(response, flags=flags)
            except Exception:  # noqa: BLE001 - a gone client must not stop the other requests' responses
                pb_utils.Logger.log_error(f"sending a response failed: {traceback.format_exc()}")


def polled_at_most_every(is_cancelled: Callable[[], bool], seconds: float) -> Callable[[], bool]:
    """`is_cancelled` asked at most once per `seconds` (True once seen stays True). The pipelines poll it every
    denoising step for every request of a batch; each ask is a round trip to the Triton server (0.1-0.4 ms
    measured), so a batch of 8 paid milliseconds per step to learn what is almost always False."""
    state = {"next": 0.0, "cancelled": False}

    def poll() -> bool:
        now = time.monotonic()
        if not state["cancelled"] and now >= state["next"]:
            state["cancelled"] = bool(is_cancelled())
            state["next"] = now + seconds
        return state["cancelled"]

    return poll


# How often a running request asks Triton whether its client cancelled it: well under one step of the slowest
# pipeline, so a cancelled request still leaves its batch at the next step or the one after.
CANCEL_POLL_S = 0.05


def respond(pb_utils: Any, arrays: dict[str, np.ndarray]) -> Any:
    """One decoupled response carrying `arrays` as output tensors."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])


def fail(pb_utils: Any, outbox: Outbox, sender: Any, message: str, code: int) -> None:
    """End a request's stream with an error (FINAL)."""
    # gRPC streams carry only the error text, not its code: the gateway reads the kind from this
    # prefix (ember.gateway.backend._classify).
    if code == pb_utils.TritonError.INVALID_ARG:
        message = f"invalid input: {message}"
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    outbox.send(
        pb_utils, sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), final
    )


def execute(pb_utils: Any, model: EndpointModel, requests: list) -> None:
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    # 1. Parse and validate every request; answer the bad ones now, keep the good ones
    senders, items = [], []
    for request in requests:
        sender = request.get_response_sender()
        arrays = {}
        for name in model.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            arrays[name] = None if tensor is None else tensor.as_numpy()
        try:
            item = model.parse(
                arrays, model.defaults, polled_at_most_every(request.is_cancelled, CANCEL_POLL_S)
            )
        except (ValueError, KeyError, TypeError) as exc:  # malformed tensors or OPTIONS fields
            fail(pb_utils, model.outbox, sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            continue
        problems = model.check(item)
        if problems:
            fail(pb_utils, model.outbox, sender, "; ".join(problems), pb_utils.TritonError.INVALID_ARG)
            continue
        senders.append(sender)
        items.append(item)
    if not items:
        return

    # 2. Run them together (the pipeline groups compatible ones), streaming progress per step
    last_sent = [float("-inf")] * len(senders)

    def on_step(index: int, step: int, total: int) -> None:
        now = time.monotonic()
        if step in (1, total) or now - last_sent[index] >= model.progress_every_s:
            last_sent[index] = now
            model.outbox.send(pb_utils, senders[index], respond(pb_utils, model.progress_arrays(step, total)))

    log_arrays = model.log_arrays

    def on_log(index: int, message: str) -> None:
        pb_utils.Logger.log_info(f"{model.name}: {message}")
        if log_arrays is not None:
            model.outbox.send(pb_utils, senders[index], respond(pb_utils, log_arrays(message)))

    try:
        # models that stream LOG responses take on_log as well
        extra = () if log_arrays is None else (on_log,)
        results = model.pipeline(items, on_step, *extra)
    except Exception as exc:  # noqa: BLE001 - every stream must end, whatever broke
        pb_utils.Logger.log_error(f"{model.name} pipeline failed: {traceback.format_exc()}")
        for sender in senders:
            fail(
                pb_utils,
                model.outbox,
                sender,
                f"{model.name} pipeline failed: {exc}",
                pb_utils.TritonError.INTERNAL,
            )
        return

    # 3. Result (or the request's own error, or its cancellation); the result response carries the FINAL
    #    flag itself: a client that stops reading at the result (the gateway does) leaves no trailing empty
    #    response behind in Triton's stream state.
    for sender, result in zip(senders, results, strict=True):
        error = getattr(result, "error", None)
        if error is not None:
            fail(pb_utils, model.outbox, sender, error, pb_utils.TritonError.INVALID_ARG)
            continue
        if result.cancelled:
            pb_utils.Logger.log_info(
                f"{model.name}: a request was cancelled by its client and left its batch"
            )
            fail(pb_utils, model.outbox, sender, "request cancelled", pb_utils.TritonError.CANCELLED)
            continue
        note = model.result_note(result) if model.result_note else None
        if note:
            pb_utils.Logger.log_info(f"{model.name}: {note}")
        model.outbox.send(pb_utils, sender, respond(pb_utils, model.result_arrays(result)), final)
