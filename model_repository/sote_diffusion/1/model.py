"""fal-ai/stable-cascade/sote-diffusion inside Triton (Python backend, decoupled): pb_utils <-> ember.pipeline.

Per request: one response per denoising step of either stage carrying PROGRESS [step, total] (total =
first_stage_steps + second_stage_steps), then one carrying IMAGES, NSFW and TIMINGS with the FINAL flag.
A bad request is answered with an INVALID_ARG error, a cancelled one with a CANCELLED error (both FINAL);
neither disturbs the others in the batch. The stub imports numpy, torch and ember from the virtualenv
through PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import dataclasses
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from ember.pipeline.sote_io import INPUT_NAMES, parse_sote_request, progress_arrays, result_arrays
from ember.pipeline.stable_cascade import (
    FAMILY,
    VARIANT,
    CascadeRequest,
    check_request,
    load_stable_cascade_pipeline,
)
from ember.settings import get_settings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(arrays: dict[str, np.ndarray]) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])


def _fail(sender: pb_utils.InferenceResponseSender, message: str, code: int) -> None:
    # gRPC streams carry only the error text, not its code: the gateway reads the kind from this prefix.
    if code == pb_utils.TritonError.INVALID_ARG:
        message = f"invalid input: {message}"
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        self.pipeline = load_stable_cascade_pipeline(settings)
        width, height = settings.model_entry(FAMILY, VARIANT).get("default_size", (1024, 1536))
        self.defaults = dataclasses.replace(
            CascadeRequest(prompt="", seed=0), width=int(width), height=int(height)
        )
        self.log = pb_utils.Logger

    def execute(self, requests: list) -> None:
        # 1. Parse and validate every request; answer the bad ones now, keep the good ones
        senders, items = [], []
        for request in requests:
            sender = request.get_response_sender()
            arrays = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                arrays[name] = None if tensor is None else tensor.as_numpy()
            try:
                item = parse_sote_request(arrays, self.defaults, request.is_cancelled)
            except ValueError as exc:
                _fail(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            problems = check_request(item)
            if problems:
                _fail(sender, "; ".join(problems), pb_utils.TritonError.INVALID_ARG)
                continue
            senders.append(sender)
            items.append(item)
        if not items:
            return

        # 2. Run them together (the pipeline groups compatible ones), streaming progress per step
        def on_step(index: int, step: int, total: int) -> None:
            senders[index].send(_response(progress_arrays(step, total)))

        try:
            results = self.pipeline(items, on_step)
        except Exception as exc:  # noqa: BLE001 - every stream must end, whatever broke
            self.log.log_error(f"sote_diffusion pipeline failed: {traceback.format_exc()}")
            for sender in senders:
                _fail(sender, f"sote_diffusion pipeline failed: {exc}", pb_utils.TritonError.INTERNAL)
            return

        # 3. Images (or the cancellation) per request; the images response carries the FINAL flag itself
        for sender, result in zip(senders, results, strict=True):
            if result.cancelled:
                self.log.log_info("sote_diffusion: a request was cancelled by its client and left its batch")
                _fail(sender, "request cancelled", pb_utils.TritonError.CANCELLED)
                continue
            sender.send(_response(result_arrays(result)), flags=FINAL)

    # No finalize(): as lcm, process exit frees the onnxruntime sessions (see model_repository/lcm).
