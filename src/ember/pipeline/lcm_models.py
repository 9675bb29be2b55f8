"""fal-ai/lcm's `model` field: one pipeline per model behind the LcmPipeline interface (problems, __call__,
warmup), so the Triton model serves "sdv1-5" and "sdxl" from one execute().

Loading policy: the default model (sdv1-5) is resident, loaded and warmed at start; SDXL loads on its first
request and then stays resident. So start-up and SD1.5 requests pay nothing for SDXL (no memory, no
load time, the same code path: one dict lookup per request), and a server that never sees model="sdxl"
never loads it. The first SDXL request waits for the load (seconds for the tiny demo; for the real
weights, the ONNX sessions or torch modules of ~7 GB fp16), and so does whatever shares its execute().
Artifacts (exports) are built ahead by the launcher (ember.serve SHARED_STAGES), not in a request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from ember.pipeline.lcm import LcmPipeline, check_request
from ember.pipeline.requests import StepCallback, Text2ImageRequest, Text2ImageResult
from ember.settings import Settings


class LcmModels:
    def __init__(self, resident: LcmPipeline, lazy: dict[str, Callable[[], LcmPipeline]]):
        self.default = resident
        self._pipelines: dict[str, LcmPipeline] = {resident.model: resident}
        self._lazy = dict(lazy)
        self._lock = threading.Lock()

    @classmethod
    def with_lazy_sdxl(cls, settings: Settings, resident: LcmPipeline) -> LcmModels:
        """`resident` (sdv1-5) plus SDXL on first use, sharing the resident's safety checker."""
        from ember.pipeline.lcm import load_lcm_pipeline

        def load_sdxl() -> LcmPipeline:
            checker = resident.safety_checker
            return load_lcm_pipeline(settings, "sdxl", safety=checker is not None, safety_checker=checker)

        return cls(resident, {"sdxl": load_sdxl})

    @property
    def models(self) -> list[str]:
        return sorted({*self._pipelines, *self._lazy})

    def __getattr__(self, name: str) -> Any:
        # Anything else is the resident (default) pipeline's, so callers written against one LcmPipeline
        # (its safety_checker, runners, options) keep working unchanged.
        return getattr(self.__dict__["default"], name)

    def pipeline(self, model: str) -> LcmPipeline:
        """The pipeline of `model`, loading it first if it is lazy. KeyError: not served here."""
        pipeline = self._pipelines.get(model)
        if pipeline is not None:
            return pipeline
        with self._lock:
            if model not in self._pipelines:
                self._pipelines[model] = self._lazy[model]()
            return self._pipelines[model]

    def warmup(self, width: int = 512, height: int = 512, steps: int = 4) -> None:
        self.default.warmup(width, height, steps)

    def problems(self, request: Text2ImageRequest) -> list[str]:
        """The model's own problems; loads a lazy model on its first request. A model that fails to load
        answers with the reason (the server log has the traceback) and is tried again next time."""
        if request.model not in self._pipelines and request.model not in self._lazy:
            return [*check_request(request), f"model {request.model!r} is not served here ({self.models})"]
        try:
            pipeline = self.pipeline(request.model)
        except Exception as exc:  # noqa: BLE001 - the request gets the reason; the other models keep serving
            return [
                f"model {request.model!r} could not be loaded on this server: {type(exc).__name__}: {exc}"
            ]
        return pipeline.problems(request)

    def __call__(
        self, requests: Sequence[Text2ImageRequest], on_step: StepCallback | None = None
    ) -> list[Text2ImageResult]:
        """Each model's requests through its pipeline (which batches them), results in request order."""
        step = on_step or (lambda index, s, total: None)
        by_model: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_model.setdefault(request.model, []).append(index)
        results: dict[int, Text2ImageResult] = {}
        for model, indices in by_model.items():

            def forward(j: int, s: int, total: int, indices: list[int] = indices) -> None:
                step(indices[j], s, total)

            out = self.pipeline(model)([requests[i] for i in indices], forward)
            results.update(zip(indices, out, strict=True))
        return [results[i] for i in range(len(requests))]
