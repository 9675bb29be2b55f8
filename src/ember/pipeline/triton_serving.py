"""The execute() loop every decoupled endpoint model shares: pb_utils tensors in, pipeline, responses out.

Per request: LOG responses while the pipeline loads what the request names (models that stream them),
one response per denoising step carrying PROGRESS [step, total], then one carrying the result tensors with
the FINAL flag. A bad request (or one its pipeline refuses on its own: `result.error`) is answered with an
INVALID_ARG error, a cancelled one with a CANCELLED error (both FINAL); neither disturbs the others in the
batch.

`pb_utils` is passed in: it exists only inside Triton's Python stub, and this module must import in tests.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def respond(pb_utils: Any, arrays: dict[str, np.ndarray]) -> Any:
    """One decoupled response carrying `arrays` as output tensors."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])


def fail(pb_utils: Any, sender: Any, message: str, code: int) -> None:
    """End a request's stream with an error (FINAL)."""
    # gRPC streams carry only the error text, not its code: the gateway reads the kind from this
    # prefix (ember.gateway.backend._classify).
    if code == pb_utils.TritonError.INVALID_ARG:
        message = f"invalid input: {message}"
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=final)


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
            item = model.parse(arrays, model.defaults, request.is_cancelled)
        except (ValueError, KeyError, TypeError) as exc:  # malformed tensors or OPTIONS fields
            fail(pb_utils, sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            continue
        problems = model.check(item)
        if problems:
            fail(pb_utils, sender, "; ".join(problems), pb_utils.TritonError.INVALID_ARG)
            continue
        senders.append(sender)
        items.append(item)
    if not items:
        return

    # 2. Run them together (the pipeline groups compatible ones), streaming progress per step
    def on_step(index: int, step: int, total: int) -> None:
        senders[index].send(respond(pb_utils, model.progress_arrays(step, total)))

    log_arrays = model.log_arrays

    def on_log(index: int, message: str) -> None:
        pb_utils.Logger.log_info(f"{model.name}: {message}")
        if log_arrays is not None:
            senders[index].send(respond(pb_utils, log_arrays(message)))

    try:
        # models that stream LOG responses take on_log as well
        extra = () if log_arrays is None else (on_log,)
        results = model.pipeline(items, on_step, *extra)
    except Exception as exc:  # noqa: BLE001 - every stream must end, whatever broke
        pb_utils.Logger.log_error(f"{model.name} pipeline failed: {traceback.format_exc()}")
        for sender in senders:
            fail(pb_utils, sender, f"{model.name} pipeline failed: {exc}", pb_utils.TritonError.INTERNAL)
        return

    # 3. Result (or the request's own error, or its cancellation); the result response carries the FINAL
    #    flag itself: a client that stops reading at the result (the gateway does) leaves no trailing empty
    #    response behind in Triton's stream state.
    for sender, result in zip(senders, results, strict=True):
        error = getattr(result, "error", None)
        if error is not None:
            fail(pb_utils, sender, error, pb_utils.TritonError.INVALID_ARG)
            continue
        if result.cancelled:
            pb_utils.Logger.log_info(
                f"{model.name}: a request was cancelled by its client and left its batch"
            )
            fail(pb_utils, sender, "request cancelled", pb_utils.TritonError.CANCELLED)
            continue
        note = model.result_note(result) if model.result_note else None
        if note:
            pb_utils.Logger.log_info(f"{model.name}: {note}")
        sender.send(respond(pb_utils, model.result_arrays(result)), flags=final)
