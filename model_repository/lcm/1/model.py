"""fal-ai/lcm inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.

Per request: one response per denoising step carrying PROGRESS [step, total], then one carrying IMAGES,
NSFW and TIMINGS with the FINAL flag. A bad request is answered with an INVALID_ARG error, a cancelled
one with a CANCELLED error (both FINAL); neither disturbs the others in the batch.
The stub imports numpy, torch and ember from the virtualenv through PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import traceback

import triton_python_backend_utils as pb_utils

from ember.pipeline import load_lcm_pipeline
from ember.pipeline.lcm_io import INPUT_NAMES, LcmDefaults, parse_lcm_request, progress_arrays, result_arrays
from ember.pipeline.lcm_models import LcmModels
from ember.pipeline.lora_io import LoraFiles
from ember.pipeline.triton_serving import fail, respond
from ember.settings import get_settings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
VARIANT = "sdv1-5"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        self.pipeline = load_lcm_pipeline(settings, variant=VARIANT)
        width, height = settings.model_entry("lcm", VARIANT).get("default_size", (512, 512))
        self.defaults = LcmDefaults(width=int(width), height=int(height))
        # The realtime path (512 x 512, 4 steps) must not pay first-call set-up: run it once now.
        self.pipeline.warmup(self.defaults.width, self.defaults.height, self.defaults.num_inference_steps)
        # MODEL "sdxl": loaded on its first request, then resident; sdv1-5 requests never wait for it
        self.pipeline = LcmModels.with_lazy_sdxl(settings, self.pipeline)
        self.log = pb_utils.Logger
        self.lora_files = LoraFiles()  # lora_url files parsed once per distinct content

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
                item = parse_lcm_request(arrays, self.defaults, request.is_cancelled, self.lora_files)
            except ValueError as exc:
                fail(pb_utils, sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            problems = self.pipeline.problems(item)
            if problems:
                fail(pb_utils, sender, "; ".join(problems), pb_utils.TritonError.INVALID_ARG)
                continue
            senders.append(sender)
            items.append(item)
        if not items:
            return

        # 2. Run them together (the pipeline groups compatible ones), streaming progress per step
        def on_step(index: int, step: int, total: int) -> None:
            senders[index].send(respond(pb_utils, progress_arrays(step, total)))

        try:
            results = self.pipeline(items, on_step)
        except Exception as exc:  # noqa: BLE001 - every stream must end, whatever broke
            self.log.log_error(f"lcm pipeline failed: {traceback.format_exc()}")
            for sender in senders:
                fail(pb_utils, sender, f"lcm pipeline failed: {exc}", pb_utils.TritonError.INTERNAL)
            return

        # 3. Images (or the cancellation) per request, then the final flag
        for sender, result in zip(senders, results, strict=True):
            if result.cancelled:
                self.log.log_info("lcm: a request was cancelled by its client and left its batch")
                fail(pb_utils, sender, "request cancelled", pb_utils.TritonError.CANCELLED)
                continue
            # Logged, not sent: Triton 2.51's Python stub cannot attach response parameters, and the
            # gateway knows the same fact from its own input (LCM never uses a negative_prompt).
            if result.negative_prompt_ignored:
                self.log.log_info(
                    "lcm: negative_prompt ignored (LCM distils guidance; diffusers ignores it too)"
                )
            # The images response carries the FINAL flag itself: a client that stops reading at IMAGES
            # (the gateway does) leaves no trailing empty response behind in Triton's stream state.
            sender.send(respond(pb_utils, result_arrays(result)), flags=FINAL)

    # No finalize(): releasing the onnxruntime sessions there (their intra-op thread pools) stalls the
    # stub's unload until Triton's 30 s exit timeout (measured with Triton 2.51); process exit frees them.
