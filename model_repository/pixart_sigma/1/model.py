"""fal-ai/pixart-sigma inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.

The request/response protocol (progress per step, FINAL result, INVALID_ARG / CANCELLED errors) is the
shared loop in ember.pipeline.triton_serving. The stub imports numpy, torch and ember from the virtualenv
through PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ember.pipeline.serving_models import endpoint_model
from ember.pipeline.triton_serving import execute
from ember.settings import get_settings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        self.model = endpoint_model("pixart_sigma", get_settings())

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)

    # No finalize(): releasing the onnxruntime sessions there stalls the stub's unload until Triton's exit
    # timeout (measured with Triton 2.51 on the lcm model); process exit frees them.
