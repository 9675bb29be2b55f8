"""fal-ai/lora inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.lora.

The request/response protocol is the shared loop in ember.pipeline.triton_serving: LOG responses while a
request's base model loads, one PROGRESS response per denoising step, then IMAGES, NSFW and TIMINGS with
the FINAL flag. A bad request (or one the pipeline refuses alone: a LoRA for another model, an unserved
field) is answered with an INVALID_ARG error, a cancelled one with CANCELLED (both FINAL); neither
disturbs the others in the batch.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ember.pipeline.serving_models import endpoint_model
from ember.pipeline.triton_serving import execute
from ember.settings import get_settings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        self.model = endpoint_model("lora", get_settings())

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)
