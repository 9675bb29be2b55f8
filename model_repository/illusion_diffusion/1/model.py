"""fal-ai/illusion-diffusion inside Triton (Python backend, decoupled): pb_utils tensors <-> ember.pipeline.

The request/response protocol (progress per step, FINAL result with IMAGES and TIMINGS, INVALID_ARG /
CANCELLED errors) is the shared loop in ember.pipeline.triton_serving. The stub imports numpy, torch and
ember from the virtualenv through PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ember.pipeline.illusion_diffusion import check_request, load_illusion_pipeline
from ember.pipeline.illusion_io import INPUT_NAMES, IllusionDefaults, parse_illusion_request, result_arrays
from ember.pipeline.lcm_io import progress_arrays
from ember.pipeline.triton_serving import EndpointModel, execute
from ember.settings import get_settings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        width, height = settings.model_entry("illusion_diffusion", "sdv1-5").get("default_size", (1024, 1024))
        self.model = EndpointModel(
            name="illusion_diffusion",
            input_names=INPUT_NAMES,
            parse=parse_illusion_request,
            check=check_request,
            pipeline=load_illusion_pipeline(settings),
            progress_arrays=progress_arrays,
            result_arrays=result_arrays,
            defaults=IllusionDefaults(width=int(width), height=int(height)),
        )

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)

    # No finalize(): see model_repository/lcm/1/model.py (releasing ORT sessions stalls the unload).
