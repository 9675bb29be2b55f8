"""ONNX Runtime on the CPU execution provider: the dev/CI runtime, and the proof that exports are right.

Weight refit (LoRA) by overridable initializers: a refittable runner's session lists every weight of the
network's refit map (`<network>.refit.json`, ember.runtime.refit_map) as a graph input backed by its
initializer (ONNX IR >= 4: an initializer that is also a graph input is a default the caller may override,
`InferenceSession.get_overridable_initializers`). Refit stores the new arrays; every run feeds them, which
costs nothing on the CPU (ORT reads the numpy buffers in place), and weights not fed keep the file's values.
Switching a LoRA set is then a dict update. That session is built on the first refit away from the base;
the base weights keep running on the plain session, so requests without LoRA pay nothing. The alternative, a new session per set with
`SessionOptions.add_initializer`, keeps ORT's constant-weight optimizations (MatMul weight prepacking) but
costs a session build per switch: measured on the full-size SD1.5 UNet (benchmarks/NOTES.md, "LoRA refit on
ONNX Runtime"), 8-17 s per switch against ~0, for a small per-run cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ember.runtime.base import RefitNotSupportedError, Runner
from ember.runtime.refit_map import (
    CurrentWeights,
    OnnxWeights,
    read_refit_map,
    refit_map_path,
    stage_refit,
)
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
    """One network's ONNX Runtime session.

    `refittable`: weights can be swapped with `refit` (LoRA). The base weights always run on the plain
    session, with ORT's constant-weight optimizations (no cost on the hot path of requests without LoRA,
    and base -> A -> base bit-identical by construction). The first refit away from the base builds a
    second session whose refit-map initializers are overridable graph inputs; while weights differ from
    the file's, runs go there and feed them (zero-copy on CPU). It costs a second copy of the network
    in memory once a LoRA has been used.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        onnx_path: Path,
        intra_op_threads: int | None = None,
        providers: list[tuple[str, dict[str, Any]]] | None = None,
        refittable: bool = False,
    ):
        self.name = spec.name
        providers = providers or [("CPUExecutionProvider", {})]
        # Outputs come back through numpy (host memory) whatever the provider; GPU providers still run the
        # graph on the device. IO binding to device tensors would save the copies (a later step).
        self.device = torch.device("cpu")
        self._spec = spec
        refit_map = read_refit_map(onnx_path) if refittable else None
        if refittable and refit_map is None:
            raise RefitNotSupportedError(
                f"{onnx_path} has no refit map ({refit_map_path(onnx_path).name}): it was exported before "
                "refit maps; delete its artifact directory (or run `python -m export onnx`) to re-export"
            )
        self._weights = OnnxWeights(onnx_path, refit_map) if refit_map is not None else None
        # Initializer name -> the array fed in its place on every run (ONNX layout); only weights that
        # differ from the file's.
        self._overrides: dict[str, np.ndarray] = {}
        self._onnx_path, self._threads, self._providers = onnx_path, intra_op_threads, providers
        self._session = self._new_session(str(onnx_path))
        self._refit_session: ort.InferenceSession | None = None  # built on the first refit off the base

    def _new_session(self, model: str | bytes, external_dir: Path | None = None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        # Networks run one after another inside a request, so all cores go to each op (intra-op) and
        # none to running ops side by side (inter-op).
        options.intra_op_num_threads = self._threads or _cpu_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if external_dir is not None:
            # The graph comes from memory: external weight files are found next to the .onnx. ORT warns
            # once per overridable initializer that it is not constant: that is the point here.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(external_dir)
            )
            options.log_severity_level = 3
        return ort.InferenceSession(
            model,
            options,
            providers=[name for name, _ in self._providers],
            provider_options=[opts for _, opts in self._providers],
        )

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {
            t.name: np.ascontiguousarray(feeds[t.name].detach().to("cpu", t.dtype).numpy())
            for t in self._spec.inputs
        }
        if self._overrides:
            assert self._refit_session is not None
            outputs = self._refit_session.run(self._spec.output_names, {**inputs, **self._overrides})
        else:
            outputs = self._session.run(self._spec.output_names, inputs)
        return {
            name: torch.from_numpy(value)
            for name, value in zip(self._spec.output_names, outputs, strict=True)
        }

    def _refit_weights(self, what: str) -> OnnxWeights:
        if self._weights is None:
            raise RefitNotSupportedError(
                f"this ONNX Runtime runner of {self.name!r} was built without refittable=True, so it cannot "
                f"{what}: create it with create_runner(..., refittable=True)"
            )
        return self._weights

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Set weights by the source component's state-dict names (fused LoRA weights, or the base again).

        Values equal to the file's drop their override, so restoring the base feeds nothing."""
        stage_refit(self._refit_weights("refit weights"), self._overrides, weights, self.name)
        if self._overrides and self._refit_session is None:
            assert self._weights is not None
            names = {entry["onnx"] for entry in self._weights.map.values()}
            graph = _with_overridable(self._onnx_path, names)
            self._refit_session = self._new_session(graph, self._onnx_path.parent)

    def weights(self) -> Mapping[str, torch.Tensor]:
        """The current weights by state-dict name, in its layout (transposes undone), read on access."""
        return CurrentWeights(self._refit_weights("expose its weights"), self._overrides)


def _with_overridable(onnx_path: Path, names: set[str]) -> bytes:
    """The graph of `onnx_path` (external data left on disk) with the named initializers also listed as
    graph inputs, serialized."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    listed = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name in names and init.name not in listed:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    return model.SerializeToString()
