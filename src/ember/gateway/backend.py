"""The gateway's view of the inference server: an interface (vLLM's `EngineClient`), and its
implementation over Triton's gRPC streaming API.

The endpoint models are decoupled: a request gets one response per denoising step (carrying
PROGRESS) and a last one carrying the endpoint's final tensors. One gRPC stream per request keeps
cancellation per request: cancelling the stream reaches the model as `request.is_cancelled()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tritonclient.grpc.aio as grpcclient  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

# Output a response carries when it is the last one of a request.
FINAL_OUTPUT = "IMAGES"


@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class Log:
    """A status line from the model (e.g. a base model loading on first use): one line in the job's logs."""

    message: str


@dataclass(frozen=True)
class Final:
    outputs: dict[str, np.ndarray]


class BackendError(Exception):
    """The inference server failed a request.

    kind: "unavailable" (server down or model not ready: retryable), "invalid" (the model refused the
    input), "cancelled", or "internal" (the model failed).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind == "unavailable"


class Backend(Protocol):
    def generate(
        self, model: str, inputs: dict[str, np.ndarray], request_id: str
    ) -> AsyncGenerator[Progress | Log | Final, None]:
        """Progress events, then exactly one Final. Closing the generator early (`aclose()`, which
        the worker does through `contextlib.aclosing`) cancels the request."""
        ...

    async def ready(self, models: list[str]) -> bool: ...

    async def close(self) -> None: ...


def _classify(message: str) -> str:
    lowered = message.lower()
    if "cancel" in lowered:
        return "cancelled"
    if any(s in lowered for s in ("unavailable", "failed to connect", "connection refused", "not ready",
                                  "socket closed", "unknown model", "is not found", "no such model")):
        return "unavailable"
    if "invalid argument" in lowered or "invalid_arg" in lowered or "invalid input" in lowered:
        return "invalid"
    return "internal"


class TritonBackend:
    """Backend over `tritonclient.grpc.aio`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = grpcclient.InferenceServerClient(url=url)

    async def generate(
        self, model: str, inputs: dict[str, np.ndarray], request_id: str
    ) -> AsyncGenerator[Progress | Log | Final, None]:
        infer_inputs = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)

        async def one_request() -> AsyncIterator[dict]:
            yield {"model_name": model, "inputs": infer_inputs, "request_id": request_id}

        try:
            responses = self._client.stream_infer(inputs_iterator=one_request())
        except InferenceServerException as exc:
            raise BackendError(_classify(str(exc)), str(exc)) from exc
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise BackendError(_classify(error.message()), error.message())
                progress = result.as_numpy("PROGRESS")
                if progress is not None:
                    step, total = (int(v) for v in progress.reshape(-1)[:2])
                    yield Progress(step, total)
                    continue
                if result.get_output("LOG") is not None and result.get_output(FINAL_OUTPUT) is None:
                    yield Log(result.as_numpy("LOG").reshape(-1)[0].decode("utf-8", "replace"))
                    continue
                if result.get_output(FINAL_OUTPUT) is not None:
                    outputs = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
                    finished = True
                    yield Final(outputs)
                    return
            raise BackendError("internal", f"{model}: the response stream ended without a result")
        except BackendError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc.aio.AioRpcError and friends: the server went away
            details = getattr(exc, "details", None)  # AioRpcError's one-line reason; str() is multi-line
            reason = details() if callable(details) else str(exc)
            raise BackendError("unavailable", f"inference server: {reason}") from exc
        finally:
            if not finished:
                # Consumer stopped early (job cancelled, client gone): cancel the Triton request.
                responses.cancel()

    async def ready(self, models: list[str]) -> bool:
        try:
            if not await self._client.is_server_ready():
                return False
            for model in models:
                if not await self._client.is_model_ready(model):
                    return False
            return True
        except Exception:  # noqa: BLE001 - connection refused while Triton (re)starts
            return False

    async def close(self) -> None:
        await self._client.close()
