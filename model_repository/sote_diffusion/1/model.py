"""fal-ai/stable-cascade/sote-diffusion inside Triton (Python backend, decoupled): pb_utils <-> ember.pipeline.

Progress covers both stages (total = first_stage_steps + second_stage_steps). The request/response
protocol is the shared loop in ember.pipeline.triton_serving. The stub imports numpy, torch and ember from
the virtualenv through PYTHONPATH (ember.triton sets it).
"""

from __future__ import annotations

import dataclasses

import triton_python_backend_utils as pb_utils

from ember.pipeline.sote_io import INPUT_NAMES, parse_sote_request, progress_arrays, result_arrays
from ember.pipeline.stable_cascade import (
    FAMILY,
    VARIANT,
    CascadeRequest,
    check_request,
    load_stable_cascade_pipeline,
)
from ember.pipeline.triton_serving import EndpointModel, execute
from ember.settings import get_settings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = get_settings()
        # The launcher (make serve) has built the artifacts already; this only builds what is missing.
        width, height = settings.model_entry(FAMILY, VARIANT).get("default_size", (1024, 1536))
        self.model = EndpointModel(
            name="sote_diffusion",
            input_names=INPUT_NAMES,
            parse=parse_sote_request,
            check=check_request,
            pipeline=load_stable_cascade_pipeline(settings),
            progress_arrays=progress_arrays,
            result_arrays=result_arrays,
            defaults=dataclasses.replace(CascadeRequest(prompt="", seed=0), width=int(width), height=int(height)),
        )

    def execute(self, requests: list) -> None:
        execute(pb_utils, self.model, requests)

    # No finalize(): as lcm, process exit frees the onnxruntime sessions (see model_repository/lcm).
