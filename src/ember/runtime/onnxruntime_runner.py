"""ONNX Runtime on the CPU execution provider: the dev/CI runtime, and the proof that exports are right."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ember.runtime.base import Runner
from ember.specs.base import NetworkSpec


def _cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxRuntimeRunner(Runner):
    def __init__(self, spec: NetworkSpec, onnx_path: Path, intra_op_threads: int | None = None):
        self.name = spec.name
        self.device = torch.device("cpu")
        self._spec = spec
        options = ort.SessionOptions()
        # Networks run one after another inside a request, so all cores go to each op (intra-op) and
        # none to running ops side by side (inter-op).
        options.intra_op_num_threads = intra_op_threads or _cpu_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

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
