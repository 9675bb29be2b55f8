"""Where TensorRT engines live and what they depend on: pure Python, importable without TensorRT or CUDA.

An engine is only valid for the exact ONNX it came from, the GPU architecture it was tuned on, the TensorRT
version that built it, the shape profiles and the precision. All of that goes into one key; its hash names the
directory, so a change of any field builds new engines next to the old ones instead of loading a stale plan:

    <artifacts>/tensorrt/<key hash>/engines.json   the key, per network its plan, profiles, verification
    <artifacts>/tensorrt/<key hash>/<network>.plan
    <export_dir>/tensorrt-timing/<gpu>-sm<cc>-trt<version>.cache   kernel timings, shared by every model
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.specs.base import ShapeBucket, fal_buckets

ENGINES_MANIFEST = "engines.json"
PRECISIONS = ("fp16", "bf16", "fp32")
# none: weights baked in (fastest). lora: BuilderFlag.REFIT, any new weights can be refit (LoRA fusing).
# strip: REFIT_IDENTICAL + STRIP_PLAN, a weightless plan refit from the ONNX weights at load (small files,
# same kernels as `none`; the weights must be exactly the build weights, so no LoRA).
REFIT_MODES = ("none", "lora", "strip")


@dataclass(frozen=True)
class GpuIdentity:
    """What a plan is tuned for. Plans are not portable across compute capabilities, and TensorRT may pick
    different tactics per SKU, so the name is part of the key too."""

    name: str  # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int]  # (9, 0) for Hopper

    @property
    def slug(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}-sm{self.capability[0]}{self.capability[1]}"

    @classmethod
    def current(cls, device: str = "cuda") -> GpuIdentity:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT engines are built on the GPU that runs them: no CUDA device here")
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return cls(torch.cuda.get_device_name(index), (major, minor))


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built; every field is part of the cache key."""

    precision: str = "fp16"
    # Strongly typed networks take each tensor's type from the ONNX (exported at `precision`) instead of
    # letting the builder choose per layer: deterministic precision, and needed for bf16/fp8 graphs.
    strongly_typed: bool = False
    refit: str = "none"
    buckets: tuple[ShapeBucket, ...] = field(default_factory=fal_buckets)
    optimization_level: int = 3  # builder_optimization_level: 3 is TensorRT's default, 5 searches longest

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.refit not in REFIT_MODES:
            raise ValueError(f"engine refit mode must be one of {REFIT_MODES}, not {self.refit!r}")
        if not self.buckets:
            raise ValueError("engines need at least one shape bucket")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"builder optimization level is 0..5, not {self.optimization_level}")


def engine_cache_key(
    model_hash: str, networks: dict[str, int], gpu: GpuIdentity, trt_version: str, options: EngineOptions
) -> dict[str, Any]:
    """Everything a plan depends on. `model_hash` identifies the ONNX exports (the artifact directory's key
    hash: source, revision, weights fingerprint, spec versions, torch/onnx versions); `networks` maps each
    network to its spec version."""
    return {
        "model": model_hash,
        "networks": dict(sorted(networks.items())),
        "gpu": gpu.name,
        "compute_capability": f"{gpu.capability[0]}.{gpu.capability[1]}",
        "tensorrt": trt_version,
        "precision": options.precision,
        "strongly_typed": options.strongly_typed,
        "refit": options.refit,
        "optimization_level": options.optimization_level,
        "buckets": [b.key() for b in options.buckets],
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def engine_dir(artifacts_path: Path, key: dict[str, Any]) -> Path:
    return artifacts_path / "tensorrt" / key_hash(key)


def timing_cache_path(export_dir: Path, gpu: GpuIdentity, trt_version: str) -> Path:
    return export_dir / "tensorrt-timing" / f"{gpu.slug}-trt{trt_version}.cache"


@dataclass(frozen=True)
class EngineSet:
    """A complete engine directory, read back: plan file and bucket list per network."""

    path: Path
    manifest: dict[str, Any]

    def plan(self, network: str) -> Path:
        entry = self.manifest["networks"].get(network)
        if entry is None:
            raise FileNotFoundError(f"{self.path} has no engine for {network!r}: build engines first")
        return self.path / entry["file"]

    def buckets(self, network: str) -> list[ShapeBucket]:
        """The buckets of `network` in profile order (profile i of the plan is bucket i)."""
        return [ShapeBucket(**b) for b in self.manifest["networks"][network]["buckets"]]


def read_engine_set(path: Path) -> EngineSet:
    manifest_path = path / ENGINES_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no TensorRT engines at {path}: build them on this GPU with `python -m export engines` "
            "(or `make engines`)"
        )
    return EngineSet(path, json.loads(manifest_path.read_text(encoding="utf-8")))


def bucket_record(bucket: ShapeBucket) -> dict[str, Any]:
    return asdict(bucket)
