"""fal-ai/lcm inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.

The request/response protocol (PROGRESS per step, then IMAGES, NSFW and TIMINGS with the FINAL flag;
INVALID_ARG / CANCELLED errors that never disturb the rest of the batch) is the shared loop in
ember.pipeline.triton_serving. The stub imports numpy, torch and ember from the virtualenv through
PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import functools

import triton_python_backend_utils as pb_utils

from ember.pipeline import load_lcm_pipeline
from ember.pipeline.lcm_io import INPUT_NAMES, LcmDefaults, parse_lcm_request, progress_arrays, result_arrays
from ember.pipeline.lcm_models import LcmModels
from ember.pipeline.lora_io import LoraFiles
from ember.pipeline.triton_serving import EndpointModel, execute
from ember.settings import get_settings

VARIANT = "sdv1-5"


def _note(result) -> str | None:
    # Logged, not sent: Triton 2.51's Python stub cannot attach response parameters, and the gateway
    # knows the same fact from its own input (LCM never uses a negative_prompt).
    if result.negative_prompt_ignored:
        return "negative_prompt ignored (LCM distils guidance; diffusers ignores it too)"
    return None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        pipeline = load_lcm_pipeline(settings, variant=VARIANT)
        width, height = settings.model_entry("lcm", VARIANT).get("default_size", (512, 512))
        defaults = LcmDefaults(width=int(width), height=int(height))
        # The realtime path (512 x 512, 4 steps) must not pay first-call set-up: run it once now.
        pipeline.warmup(defaults.width, defaults.height, defaults.num_inference_steps)
        # MODEL "sdxl": loaded on its first request, then resident; sdv1-5 requests never wait for it
        models = LcmModels.with_lazy_sdxl(settings, pipeline)
        self.model = EndpointModel(
            name="lcm",
            input_names=INPUT_NAMES,
            # lora_url files are parsed once per distinct content (LoraFiles)
            parse=functools.partial(parse_lcm_request, lora_files=LoraFiles()),
            check=models.problems,
            pipeline=models,
            progress_arrays=progress_arrays,
            result_arrays=result_arrays,
            defaults=defaults,
            result_note=_note,
        )

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)

    # No finalize(): releasing the onnxruntime sessions there (their intra-op thread pools) stalls the
    # stub's unload until Triton's 30 s exit timeout (measured with Triton 2.51); process exit frees them.
