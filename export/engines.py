"""ONNX exports and TensorRT engines for every network of a model family, from the specs.

    python -m export onnx    --family lcm --variant sdv1-5                 # demo weights (EMBER_WEIGHTS)
    python -m export onnx    --model SimianLuo/LCM_Dreamshaper_v7          # an HF id or a local directory
    python -m export engines --precision fp16 --dynamic                    # on the GPU that will run them
    python -m export engines --refit lora                                  # refittable (LoRA refit by name)
    python -m export engines --strongly-typed --precision bf16             # types from a bf16 ONNX export
    python -m export verify                                                # re-run the engine checks

Engines: one plan per network, one optimization profile per fal image_size preset (static height x width,
batch 1..--max-batch) plus the 256..1024 px dynamic profile with --dynamic; cached by model hash, GPU name +
compute capability, TensorRT version, buckets and precision (ember.runtime.engine_cache). Each engine is
verified against ONNX Runtime fp32 on a random input per bucket (tolerance in
ember.runtime.tensorrt_build.VERIFY_REL_TOLERANCE). Prints the artifact or engine directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ember.runtime.engine_cache import PRECISIONS, REFIT_MODES, EngineOptions
from ember.settings import Settings, get_settings
from ember.specs.base import MAX_BATCH_IMAGES, fal_buckets


def onnx_settings(settings: Settings, family: str, variant: str, model: str | None) -> Settings:
    """Settings that export ONNX for this model whatever runtime it serves with; `model` (an HF id or a
    directory) replaces the models.toml source and implies real weights."""
    models = json.loads(json.dumps(settings.models))  # deep copy: the process-wide settings stay as they are
    entry = models.setdefault(family, {}).setdefault(variant, {})
    entry.pop("runtime", None)
    weights = settings.weights
    if model is not None:
        entry["source"], weights = model, "real"
    replaced = dataclasses.replace(settings, runtime="onnxruntime", weights=weights)
    object.__setattr__(replaced, "models", models)
    return replaced


def export_onnx(args: argparse.Namespace) -> Path:
    from ember.specs import ensure_artifacts

    settings = onnx_settings(get_settings(), args.family, args.variant, args.model)
    return ensure_artifacts(settings, family=args.family, variant=args.variant, progress=True)


def _options(args: argparse.Namespace) -> EngineOptions:
    buckets = fal_buckets(max_batch=args.max_batch, opt_batch=args.opt_batch, dynamic=args.dynamic)
    if args.buckets:
        wanted = set(args.buckets.split(","))
        buckets = tuple(b for b in buckets if b.name in wanted or (b.dynamic and args.dynamic))
        if not buckets:
            raise SystemExit(f"--buckets {args.buckets}: none of these are fal image_size presets")
    return EngineOptions(
        precision=args.precision,
        strongly_typed=args.strongly_typed,
        refit=args.refit,
        buckets=buckets,
        optimization_level=args.opt_level,
    )


def typed_onnx(artifacts: Any, networks: list[Any], precision: str, device: str) -> dict[str, Path]:
    """fp16/bf16 ONNX exports for strongly typed engines (the tensor types then come from the graph).

    Exported from the module loaded at that precision, on the GPU when there is one (CPU half kernels are
    incomplete); networks a spec pins to fp32 (engine_dtype) keep the fp32 export.
    """
    import warnings

    import torch

    from ember.runtime.refit_map import write_refit_map
    from ember.specs.artifacts import OPSET

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    paths: dict[str, Path] = {}
    for spec in networks:
        if dtype == torch.float32 or spec.engine_dtype == torch.float32:
            continue
        path = artifacts.path / f"{precision}" / f"{spec.name}.onnx"
        paths[spec.name] = path
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        module = spec.load(artifacts.source, artifacts.revision, dtype).to(device).eval()
        config = artifacts.config(spec.subfolder)
        sample = spec.sample_inputs(config, 2, 264, 200)
        inputs = tuple(
            (t.to(device, dtype) if t.is_floating_point() else t.to(device)) for t in sample.values()
        )
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes={t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs)},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        # Its own refit map: the constant-folded initializer names of this export differ from the fp32 one's.
        write_refit_map(path, module.float().cpu())
    return paths


def build(args: argparse.Namespace, verify: bool = True) -> Path:
    from ember.runtime.tensorrt_build import build_engines, require_tensorrt
    from ember.specs import read_artifacts
    from ember.specs.artifacts import family_spec

    try:
        require_tensorrt()
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    artifacts = read_artifacts(export_onnx(args))
    networks = list(family_spec(args.family, args.variant).load_networks())
    options = _options(args)
    onnx_paths = (
        typed_onnx(artifacts, networks, options.precision, args.device) if args.strongly_typed else None
    )
    engines = build_engines(
        artifacts,
        networks,
        options,
        get_settings().export_dir,
        onnx_paths,
        progress=True,
        verify=verify,
        device=args.device,
    )
    return engines.path


def verify(args: argparse.Namespace) -> Path:
    """Re-run the engine-vs-ONNX Runtime check of an existing engine set."""
    from ember.runtime.tensorrt_build import find_engines, verify_engine
    from ember.specs import read_artifacts
    from ember.specs.artifacts import family_spec

    artifacts = read_artifacts(export_onnx(args))
    networks = list(family_spec(args.family, args.variant).load_networks())
    options = _options(args)
    engines = find_engines(artifacts, networks, options, args.device)
    for spec in networks:
        stripped = Path(engines.manifest["networks"][spec.name]["onnx"]) if options.refit == "strip" else None
        error = verify_engine(
            spec,
            engines.plan(spec.name),
            artifacts.onnx_path(spec.name),
            artifacts.config(spec.subfolder),
            engines.buckets(spec.name),
            options,
            args.device,
            refit_from=stripped,
        )
        print(f"{spec.name}: max|trt - ort| / std(ort) = {error:.2e}")
    return engines.path


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("onnx", "export every network of the family to ONNX (verified against torch)"),
        ("engines", "build TensorRT engines for this GPU from the ONNX exports (verified against ORT)"),
        ("verify", "check existing engines against ONNX Runtime again"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--family", default="lcm")
        sub.add_argument("--variant", default="sdv1-5")
        sub.add_argument("--model", help="HF id or directory replacing the models.toml source (real weights)")
        if name == "onnx":
            continue
        sub.add_argument("--precision", choices=PRECISIONS, default="fp16")
        sub.add_argument("--strongly-typed", action="store_true", help="types from a --precision ONNX export")
        sub.add_argument("--refit", choices=REFIT_MODES, default="none")
        sub.add_argument("--dynamic", action="store_true", help="add the 256..1024 px dynamic profile")
        sub.add_argument("--buckets", help="comma list of fal presets to build (default: all)")
        sub.add_argument("--max-batch", type=int, default=MAX_BATCH_IMAGES)
        sub.add_argument("--opt-batch", type=int, default=1)
        sub.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
        sub.add_argument("--device", default="cuda")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    action = {"onnx": export_onnx, "engines": build, "verify": verify}[args.command]
    print(action(args))
