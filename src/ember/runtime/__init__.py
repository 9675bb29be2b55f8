"""Engine runtimes: onnxruntime, torch, tensorrt behind one `Runner` interface, chosen by settings.runtime.

The pipeline asks `create_runner` for each network and never looks at which runtime it got.
"""

from __future__ import annotations

import torch

from ember.runtime.base import RefitNotSupportedError, Runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts
from ember.specs.base import NetworkSpec

__all__ = ["RefitNotSupportedError", "Runner", "create_runner", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError as exc:
        raise ValueError(f"EMBER_DTYPE must be one of {sorted(_DTYPES)}, not {name!r}") from exc


def create_runner(settings: Settings, artifacts: Artifacts, spec: NetworkSpec) -> Runner:
    """The runner of `spec` for settings.runtime, loaded from `artifacts` (see ember.specs.ensure_artifacts)."""
    if settings.runtime == "onnxruntime":
        from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(spec, artifacts.onnx_path(spec.name))
    if settings.runtime == "torch":
        from ember.runtime.torch_runner import TorchRunner

        return TorchRunner(
            spec, artifacts.source, artifacts.revision, settings.device, torch_dtype(settings.dtype)
        )
    if settings.runtime == "tensorrt":
        from ember.runtime.tensorrt_runner import TensorRTRunner, engine_path

        device = torch.device(settings.device if settings.device.startswith("cuda") else "cuda")
        return TensorRTRunner(spec, engine_path(artifacts, spec.name, device), str(device))
    raise ValueError(f"unknown runtime {settings.runtime!r}")
