"""ONNX Runtime on the CPU execution provider: the dev/CI runtime, and the proof that exports are right."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ember.runtime.base import Runner
from ember.settings import Settings
from ember.specs.base import NetworkSpec


def _cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def provider_list(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """EMBER_ORT_PROVIDERS as onnxruntime (name, options) pairs, in preference order.

    tensorrt: ORT builds and caches its own engines (under <export_dir>/ort-tensorrt) in fp16 when
    EMBER_DTYPE=float16; cuda: cuDNN picks conv algorithms by heuristic (exhaustive search costs minutes
    per new shape); cpu: the fallback for any op the others do not take.
    """
    device_id = torch.device(settings.device).index or 0 if settings.device.startswith("cuda") else 0
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "tensorrt": (
            "TensorrtExecutionProvider",
            {
                "device_id": device_id,
                "trt_fp16_enable": settings.dtype == "float16",
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(settings.export_dir / "ort-tensorrt"),
                "trt_timing_cache_enable": True,
            },
        ),
        "cuda": ("CUDAExecutionProvider", {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}),
        "cpu": ("CPUExecutionProvider", {}),
    }
    chosen = [table[name] for name in settings.ort_providers]
    available = set(ort.get_available_providers())
    missing = [name for name, _ in chosen if name not in available]
    if missing:
        raise RuntimeError(
            f"EMBER_ORT_PROVIDERS asks for {missing}, this onnxruntime has {sorted(available)} "
            "(install onnxruntime-gpu for cuda/tensorrt, or set EMBER_ORT_PROVIDERS=cpu)"
        )
    return chosen


class OnnxRuntimeRunner(Runner):
    def __init__(
        self,
        spec: NetworkSpec,
        onnx_path: Path,
        intra_op_threads: int | None = None,
        providers: list[tuple[str, dict[str, Any]]] | None = None,
    ):
        self.name = spec.name
        providers = providers or [("CPUExecutionProvider", {})]
        # Outputs come back through numpy (host memory) whatever the provider; GPU providers still run the
        # graph on the device. IO binding to device tensors would save the copies (a later step).
        self.device = torch.device("cpu")
        self._spec = spec
        options = ort.SessionOptions()
        # Networks run one after another inside a request, so all cores go to each op (intra-op) and
        # none to running ops side by side (inter-op).
        options.intra_op_num_threads = intra_op_threads or _cpu_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(onnx_path),
            options,
            providers=[name for name, _ in providers],
            provider_options=[opts for _, opts in providers],
        )

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {
            t.name: np.ascontiguousarray(feeds[t.name].detach().to("cpu", t.dtype).numpy())
            for t in self._spec.inputs
        }
        outputs = self._session.run(self._spec.output_names, inputs)
        return {
            name: torch.from_numpy(value)
            for name, value in zip(self._spec.output_names, outputs, strict=True)
        }
