"""fal-ai/lora inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.lora.

Per request: LOG responses while its base model loads, one PROGRESS response per denoising step, then
IMAGES, NSFW and TIMINGS with the FINAL flag. A bad request is answered with an INVALID_ARG error, a
cancelled one with CANCELLED (both FINAL); neither disturbs the others in the batch.
"""

from __future__ import annotations

import traceback

import triton_python_backend_utils as pb_utils

from ember.pipeline.lora import LoraText2ImagePipeline, check_request
from ember.pipeline.lora_io import (
    INPUT_NAMES,
    LoraFiles,
    log_arrays,
    parse_lora_request,
    progress_arrays,
    result_arrays,
)
from ember.pipeline.triton_serving import fail, respond
from ember.settings import get_settings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # Nothing is loaded here: base models are named per request and load on first use.
        self.pipeline = LoraText2ImagePipeline(settings)
        self.model_root = settings.lora_models_dir
        self.lora_files = LoraFiles()
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
                item = parse_lora_request(arrays, self.model_root, self.lora_files, request.is_cancelled)
            except (ValueError, KeyError, TypeError) as exc:
                fail(pb_utils, sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            problems = check_request(item)
            if problems:
                fail(pb_utils, sender, "; ".join(problems), pb_utils.TritonError.INVALID_ARG)
                continue
            senders.append(sender)
            items.append(item)
        if not items:
            return

        # 2. Run them (the pipeline groups compatible ones), streaming model-loading lines and progress
        def on_step(index: int, step: int, total: int) -> None:
            senders[index].send(respond(pb_utils, progress_arrays(step, total)))

        def on_log(index: int, message: str) -> None:
            self.log.log_info(f"lora: {message}")
            senders[index].send(respond(pb_utils, log_arrays(message)))

        try:
            results = self.pipeline(items, on_step, on_log)
        except Exception as exc:  # noqa: BLE001 - every stream must end, whatever broke
            self.log.log_error(f"lora pipeline failed: {traceback.format_exc()}")
            for sender in senders:
                fail(pb_utils, sender, f"lora pipeline failed: {exc}", pb_utils.TritonError.INTERNAL)
            return

        # 3. Images, the request's error, or its cancellation, each with the final flag
        for sender, result in zip(senders, results, strict=True):
            if result.error is not None:
                fail(pb_utils, sender, result.error, pb_utils.TritonError.INVALID_ARG)
            elif result.cancelled:
                fail(pb_utils, sender, "request cancelled", pb_utils.TritonError.CANCELLED)
            else:
                sender.send(respond(pb_utils, result_arrays(result)), flags=FINAL)
