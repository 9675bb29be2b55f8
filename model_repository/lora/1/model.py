"""fal-ai/lora inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.lora.

The request/response protocol is the shared loop in ember.pipeline.triton_serving: LOG responses while a
request's base model loads, one PROGRESS response per denoising step, then IMAGES, NSFW and TIMINGS with
the FINAL flag. A bad request (or one the pipeline refuses alone: a LoRA for another model, an unserved
field) is answered with an INVALID_ARG error, a cancelled one with CANCELLED (both FINAL); neither
disturbs the others in the batch.
"""

from __future__ import annotations

import functools

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
from ember.pipeline.triton_serving import EndpointModel, execute
from ember.settings import get_settings


def _parse(arrays: dict, defaults: None, is_cancelled, *, model_root, lora_files: LoraFiles):
    return parse_lora_request(arrays, model_root, lora_files, is_cancelled)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # Nothing is loaded here: base models are named per request and load on first use.
        self.model = EndpointModel(
            name="lora",
            input_names=INPUT_NAMES,
            # LoRA files are parsed once per distinct content (LoraFiles)
            parse=functools.partial(_parse, model_root=settings.lora_models_dir, lora_files=LoraFiles()),
            check=check_request,
            pipeline=LoraText2ImagePipeline(settings),
            progress_arrays=progress_arrays,
            result_arrays=result_arrays,
            defaults=None,
            log_arrays=log_arrays,
        )

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)
