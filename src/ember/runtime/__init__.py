"""Engine runtimes: onnxruntime, torch, tensorrt behind one `Runner` interface, chosen per model.

The runtime of a model is its models.toml `runtime` key, else EMBER_RUNTIME. The pipeline asks
`create_runner` for each network and never looks at which runtime it got.
"""

from __future__ import annotations

from typing import Any

import torch

from ember.runtime.base import RefitNotSupportedError, Runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts
from ember.specs.base import NetworkSpec

__all__ = ["RefitNotSupportedError", "Runner", "create_runner", "engine_options", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError as exc:
        raise ValueError(f"EMBER_DTYPE must be one of {sorted(_DTYPES)}, not {name!r}") from exc


def engine_options(settings: Settings, family: str, variant: str) -> Any:
    """TensorRT build options of one model: its models.toml `[<family>.<variant>.engines]` table
    (precision, strongly_typed, refit, dynamic, max_batch, opt_batch, optimization_level), else defaults."""
    from ember.runtime.engine_cache import EngineOptions
    from ember.specs.base import MAX_BATCH_IMAGES, fal_buckets

    table = dict(settings.model_entry(family, variant).get("engines", {}))
    known = {
        "precision",
        "strongly_typed",
        "refit",
        "dynamic",
        "max_batch",
        "opt_batch",
        "optimization_level",
    }
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"[{family}.{variant}.engines] has unknown keys {unknown}; known: {sorted(known)}")
    buckets = fal_buckets(
        max_batch=int(table.pop("max_batch", MAX_BATCH_IMAGES)),
        opt_batch=int(table.pop("opt_batch", 1)),
        dynamic=bool(table.pop("dynamic", False)),
    )
    return EngineOptions(buckets=buckets, **table)


def create_runner(
    settings: Settings, artifacts: Artifacts, spec: NetworkSpec, refittable: bool = False
) -> Runner:
    """The runner of `spec` for its model's runtime, loaded from `artifacts` (see ember.specs.ensure_artifacts).

    `refittable`: the caller will swap weights with `Runner.refit` (LoRA). ONNX Runtime then builds a second
    session with overridable weights on the first refit (the base keeps the plain one); torch always can, TensorRT
    when its engines were built with `--refit lora`.
    """
    key = artifacts.manifest["key"]
    runtime = settings.model_runtime(key["family"], key["variant"])
    if runtime == "onnxruntime":
        from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner, provider_list

        providers = provider_list(settings)
        return OnnxRuntimeRunner(
            spec, artifacts.onnx_path(spec.name), providers=providers, refittable=refittable
        )
    if runtime == "torch":
        from ember.runtime.torch_runner import TorchRunner

        return TorchRunner(
            spec,
            artifacts.source,
            artifacts.revision,
            settings.device,
            torch_dtype(settings.dtype),
            compile_mode=settings.torch_compile,
        )
    if runtime == "tensorrt":
        from ember.runtime.tensorrt_build import find_engines
        from ember.runtime.tensorrt_runner import TensorRTRunner
        from ember.specs.artifacts import family_spec

        device = settings.device if settings.device.startswith("cuda") else "cuda"
        # The engine set's key covers every network of the family, so look it up with all of them.
        networks = list(family_spec(key["family"], key["variant"]).load_networks())
        options = engine_options(settings, key["family"], key["variant"])
        return TensorRTRunner(spec, find_engines(artifacts, networks, options, device), device)
    raise ValueError(f"unknown runtime {runtime!r}")
