"""Runs inside Triton (never imports FastAPI): shared stages and the per-endpoint pipelines built from them."""

from ember.pipeline.lcm import LcmPipeline, LcmText2ImagePipeline, check_request, load_lcm_pipeline
from ember.pipeline.requests import StepCallback, Text2ImageRequest, Text2ImageResult

__all__ = [
    "LcmPipeline",
    "LcmText2ImagePipeline",
    "StepCallback",
    "Text2ImageRequest",
    "Text2ImageResult",
    "check_request",
    "load_lcm_pipeline",
]
