"""Build TensorRT 10 engines from the ONNX exports of a model: one plan per network, one optimization profile
per shape bucket, a shared timing cache, optional refit, and a verification pass against ONNX Runtime.

Written against the TensorRT 10 Python API (NGC 24.12 ships 10.7): `create_network` takes only the
STRONGLY_TYPED flag (explicit batch is implied), `build_serialized_network`, `IProgressMonitor`, named I/O.
Nothing here runs without TensorRT and a GPU; the cache key logic lives in ember.runtime.engine_cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.runtime.engine_cache import (
    ENGINES_MANIFEST,
    EngineOptions,
    EngineSet,
    GpuIdentity,
    bucket_record,
    engine_cache_key,
    engine_dir,
    read_engine_set,
    timing_cache_path,
)
from ember.specs.artifacts import Artifacts
from ember.specs.base import NetworkSpec, ShapeBucket

try:
    import tensorrt as trt
except ImportError:
    trt = None

WORKSPACE_BYTES = 8 << 30  # tactic scratch space; the largest SDXL UNet tactics fit in far less
# Engine vs ONNX Runtime fp32 on the same random input, relative to the reference's spread:
# max|trt - ort| / std(ort). fp16 accumulates ~1e-3 relative error per layer; a 60-layer UNet ends near 1e-2.
# 5e-2 passes every sound fp16/bf16 engine and fails wrong bindings, layouts or overflow (those give >> 0.1).
VERIFY_REL_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}
# Size-independent networks (the text encoder) get one profile that serves every image size.
ANY_SIDE = (1, 1 << 15)


def require_tensorrt() -> Any:
    if trt is None:
        raise RuntimeError(
            "TensorRT is not installed: use the NGC Triton image (docker/triton.Dockerfile), or "
            "pip install tensorrt-cu12 on a CUDA machine"
        )
    return trt


def network_buckets(spec: NetworkSpec, buckets: Sequence[ShapeBucket]) -> list[ShapeBucket]:
    """The profiles a network needs: all buckets, or one any-size bucket when its shapes ignore the image size."""
    if spec.size_dependent():
        return list(buckets)
    widest = max(b.batch_max for b in buckets)
    return [
        ShapeBucket(
            "any",
            512,
            512,
            batch_opt=buckets[0].batch_opt,
            batch_max=widest,
            min_side=ANY_SIDE[0],
            max_side=ANY_SIDE[1],
        )
    ]


def _progress_monitor(report: Callable[[str], None]) -> Any:
    """An IProgressMonitor that forwards top-level build phases (tqdm's postfix in the CLI)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                report(phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


@dataclass(frozen=True)
class BuildResult:
    network: str
    plan: Path
    seconds: float
    verify_rel_error: float | None


def build_engine(
    spec: NetworkSpec,
    onnx_path: Path,
    config: dict[str, Any],
    options: EngineOptions,
    plan_path: Path,
    timing_cache: Path,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> list[ShapeBucket]:
    """Parse `onnx_path`, build one plan with a profile per bucket, write it to `plan_path` atomically."""
    trt_ = require_tensorrt()
    logger = trt_.Logger(trt_.Logger.WARNING)
    builder = trt_.Builder(logger)
    flags = 1 << int(trt_.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if options.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt_.OnnxParser(network, logger)
    # parse_from_file resolves external weight files (> 2 GB models) relative to the ONNX file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt_.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    builder_config.builder_optimization_level = options.optimization_level
    builder_config.progress_monitor = _progress_monitor(on_phase)
    # Precision: strongly typed networks carry it in the ONNX types; weakly typed ones let the builder use
    # fp16/bf16 kernels where it is faster. A spec may pin fp32 (SDXL's VAE overflows in fp16).
    precision = options.precision if spec.engine_dtype is None else _precision_name(spec.engine_dtype)
    if not options.strongly_typed:
        if precision == "fp16":
            builder_config.set_flag(trt_.BuilderFlag.FP16)
        elif precision == "bf16":
            builder_config.set_flag(trt_.BuilderFlag.BF16)
    if options.refit == "lora":
        builder_config.set_flag(trt_.BuilderFlag.REFIT)
    elif options.refit == "strip":
        builder_config.set_flag(trt_.BuilderFlag.REFIT_IDENTICAL)
        builder_config.set_flag(trt_.BuilderFlag.STRIP_PLAN)

    # Timing cache: kernel timings measured by earlier builds on this GPU + TensorRT version; a hit skips
    # re-timing that layer's tactics (a warm SDXL UNet build drops from ~10 to ~2 minutes).
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = builder_config.create_timing_cache(cache_bytes)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)

    buckets = network_buckets(spec, options.buckets)
    for bucket in buckets:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.bucket_profile(config, bucket).items():
            profile.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {spec.name} from {onnx_path} (see the log above)")
    _write_atomic(plan_path, bytes(serialized))
    _write_atomic(timing_cache, bytes(builder_config.get_timing_cache().serialize()))
    return buckets


def _precision_name(dtype: Any) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def engine_key(
    artifacts: Artifacts, networks: Sequence[NetworkSpec], gpu: GpuIdentity, options: EngineOptions
) -> dict[str, Any]:
    trt_ = require_tensorrt()
    return engine_cache_key(
        artifacts.path.name, {n.name: n.version for n in networks}, gpu, trt_.__version__, options
    )


def find_engines(
    artifacts: Artifacts, networks: Sequence[NetworkSpec], options: EngineOptions, device: str = "cuda"
) -> EngineSet:
    """The engine set of these exports for this GPU and options; raises FileNotFoundError saying how to build."""
    key = engine_key(artifacts, networks, GpuIdentity.current(device), options)
    return read_engine_set(engine_dir(artifacts.path, key))


def build_engines(
    artifacts: Artifacts,
    networks: Sequence[NetworkSpec],
    options: EngineOptions,
    export_dir: Path,
    onnx_paths: dict[str, Path] | None = None,
    progress: bool = True,
    verify: bool = True,
    device: str = "cuda",
) -> EngineSet:
    """Build (or find in the cache) an engine for every network; verify each against ONNX Runtime.

    `onnx_paths` overrides the fp32 exports of the artifact directory (the strongly typed path passes
    fp16/bf16 exports). Returns the complete engine set; its engines.json is written last.
    """
    import time

    from tqdm.auto import tqdm

    trt_ = require_tensorrt()
    gpu = GpuIdentity.current(device)
    key = engine_key(artifacts, networks, gpu, options)
    path = engine_dir(artifacts.path, key)
    if (path / ENGINES_MANIFEST).is_file():
        return read_engine_set(path)
    timing = timing_cache_path(export_dir, gpu, trt_.__version__)
    manifest: dict[str, Any] = {"key": key, "networks": {}}
    bar = tqdm(list(networks), desc=f"engines {gpu.slug}", unit="net", disable=not progress)
    for spec in bar:
        onnx_path = (onnx_paths or {}).get(spec.name) or artifacts.onnx_path(spec.name)
        plan = path / f"{spec.name}.plan"
        config = artifacts.config(spec.subfolder)
        started = time.perf_counter()
        buckets = build_engine(
            spec,
            onnx_path,
            config,
            options,
            plan,
            timing,
            on_phase=lambda phase, name=spec.name: bar.set_postfix_str(f"{name}: {phase}"),
        )
        seconds = time.perf_counter() - started
        error = None
        if verify:
            # The reference is always the fp32 export (a strongly typed fp16 ONNX is not what ORT CPU runs).
            reference = artifacts.onnx_path(spec.name)
            stripped = onnx_path if options.refit == "strip" else None
            error = verify_engine(
                spec, plan, reference, config, buckets, options, device, refit_from=stripped
            )
            bar.write(f"[ember] {spec.name}.plan verified: max|trt - ort| / std(ort) = {error:.2e}")
        manifest["networks"][spec.name] = {
            "file": plan.name,
            "onnx": str(onnx_path),
            "buckets": [bucket_record(b) for b in buckets],
            "build_seconds": round(seconds, 1),
            "verify_rel_error": error,
            "verify_tolerance": VERIFY_REL_TOLERANCE[options.precision] if verify else None,
        }
    bar.close()
    _write_atomic(path / ENGINES_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return read_engine_set(path)


class EngineVerificationError(RuntimeError):
    """An engine disagrees with ONNX Runtime beyond the tolerance of its precision."""


def verify_engine(
    spec: NetworkSpec,
    plan: Path,
    onnx_path: Path,
    config: dict[str, Any],
    buckets: Sequence[ShapeBucket],
    options: EngineOptions,
    device: str = "cuda",
    refit_from: Path | None = None,
) -> float:
    """Run the engine and ONNX Runtime (CPU, fp32 reference) on one random input per bucket (batch 1);
    return the worst max|trt - ort| / std(ort) and raise if it exceeds VERIFY_REL_TOLERANCE[precision]."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from ember.runtime.tensorrt_runner import TensorRTEngine

    engine = TensorRTEngine(spec, plan, buckets, device, refit_from=refit_from)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tolerance = VERIFY_REL_TOLERANCE[options.precision]
    worst = 0.0
    for bucket in buckets:
        _, height, width = bucket.corners()[1]
        inputs = spec.sample_inputs(config, 1, height, width, seed=3)
        got = engine.run(inputs)
        feeds = {
            name: t.numpy() if not t.is_floating_point() else t.to(torch.float32).numpy()
            for name, t in inputs.items()
        }
        feeds = {
            i.name: feeds[i.name].astype(np.float32) if i.dtype.is_floating_point else feeds[i.name]
            for i in spec.inputs
        }
        want = session.run(spec.output_names, feeds)
        for name, reference in zip(spec.output_names, want, strict=True):
            actual = got[name].float().cpu().numpy()
            rel = float(np.abs(actual - reference).max() / (reference.std() + 1e-12))
            worst = max(worst, rel)
            if not rel <= tolerance:  # also catches NaN
                raise EngineVerificationError(
                    f"{spec.name}.{name} at {bucket.key()}: TensorRT differs from ONNX Runtime by "
                    f"{rel:.3g} x std (tolerance {tolerance} for {options.precision}); rebuild with "
                    "--precision fp32 for this network to see whether fp16 overflow is the cause"
                )
    engine.close()
    return worst
