"""fal-ai/pixart-sigma inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.

The request/response protocol (progress per step, FINAL result, INVALID_ARG / CANCELLED errors) is the
shared loop in ember.pipeline.triton_serving. The stub imports numpy, torch and ember from the virtualenv
through PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ember.pipeline.pixart_io import (
    INPUT_NAMES,
    PixArtDefaults,
    parse_pixart_request,
    progress_arrays,
    result_arrays,
)
from ember.pipeline.pixart_sigma import FAMILY, VARIANT, check_request, load_pixart_sigma_pipeline
from ember.pipeline.triton_serving import EndpointModel, execute
from ember.settings import get_settings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        width, height = settings.model_entry(FAMILY, VARIANT).get("default_size", (1024, 1024))
        self.model = EndpointModel(
            name="pixart_sigma",
            input_names=INPUT_NAMES,
            parse=parse_pixart_request,
            check=check_request,
            pipeline=load_pixart_sigma_pipeline(settings),
            progress_arrays=progress_arrays,
            result_arrays=result_arrays,
            defaults=PixArtDefaults(width=int(width), height=int(height)),
        )

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)

    # No finalize(): releasing the onnxruntime sessions there stalls the stub's unload until Triton's exit
    # timeout (measured with Triton 2.51 on the lcm model); process exit frees them.
