"""One benchmark runner; what it measures is a preset file (benchmarks/presets/<name>.py).

    python -m benchmarks.run --preset lcm_demo          # make bench
    python -m benchmarks.run --preset smoke --out /tmp/bench

Per run: latency p50/p95 of each path (gateway end to end with the official fal-client, direct Triton gRPC
with client/triton_grpc.py, the in-process ember pipeline, and the diffusers pipeline on the same weights as
the baseline), throughput against concurrency through Triton's dynamic batcher, the in-process batching gain,
ONNX Runtime vs torch eager on the full-size SD1.5 UNet, the pipeline's FLOPs (and on GPU the ideal time and
peak memory). Writes <out>/<preset>.json, .md and .png. See benchmarks/NOTES.md for how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import runpy
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "benchmarks" / "presets"
RESULTS = REPO / "benchmarks" / "results"


def load_preset(name: str) -> dict[str, Any]:
    """A preset's module-level constants (nanoGPT-style config file), by name or path."""
    path = Path(name) if name.endswith(".py") else PRESETS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.py") if p.stem != "__init__")
        raise SystemExit(f"no preset {name!r}; known: {known}")
    values = {k: v for k, v in runpy.run_path(str(path)).items() if not k.startswith("_")}
    values["name"] = path.stem
    return values


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times: list[float]) -> dict[str, Any]:
    return {
        "p50_s": percentile(times, 50),
        "p95_s": percentile(times, 95),
        "mean_s": statistics.fmean(times),
        "n": len(times),
        "all_s": times,
    }


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _triton_client() -> Any:
    """client/triton_grpc.py (an example script, not a package) loaded by path: its `generate` is the call."""
    spec = importlib.util.spec_from_file_location(
        "ember_client_triton_grpc", REPO / "client" / "triton_grpc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Paths:
    """The request paths being compared, each a zero-argument callable that runs one request."""

    def __init__(self, preset: dict[str, Any], var_dir: Path):
        self.preset = preset
        self.var_dir = var_dir
        self.stack: Any = None
        self.env: dict[str, str] = {}
        self.calls: dict[str, Callable[[int], Any]] = {}

    def request(self, seed: int) -> Any:
        from ember.pipeline.requests import Text2ImageRequest

        p = self.preset
        return Text2ImageRequest(
            prompt=p["prompt"],
            seed=seed,
            num_images=p["num_images"],
            width=p["width"],
            height=p["height"],
            num_inference_steps=p["num_inference_steps"],
            guidance_scale=p["guidance_scale"],
        )

    def open(self) -> None:
        from ember.settings import load_settings

        wanted = self.preset["paths"]
        needs_stack = any(p in wanted for p in ("gateway", "triton_grpc"))  # throughput needs Triton too
        run, queue, http, rest, t_http, t_grpc, t_metrics = _free_ports(7)
        self.env = {
            **os.environ,
            "EMBER_VAR_DIR": str(self.var_dir),
            "EMBER_WEIGHTS": self.preset["weights"],
            "EMBER_RUN_PORT": str(run),
            "EMBER_QUEUE_PORT": str(queue),
            "EMBER_HTTP_PORT": str(http),
            "EMBER_REST_PORT": str(rest),
            "EMBER_TRITON_HTTP_PORT": str(t_http),
            "EMBER_TRITON_GRPC_PORT": str(t_grpc),
            "EMBER_TRITON_METRICS_PORT": str(t_metrics),
            "EMBER_TRITON_GRPC_URL": f"127.0.0.1:{t_grpc}",
            "EMBER_MODEL_REPOSITORY": os.environ.get(
                "EMBER_MODEL_REPOSITORY", str(REPO / "model_repository")
            ),
        }
        settings = load_settings(self.env, dotenv=Path("/nonexistent"))
        self.settings = settings
        if "in_process" in wanted or "batch_gain_at" in self.preset:
            from ember.pipeline import load_lcm_pipeline

            self.pipeline = load_lcm_pipeline(settings)
            self.calls["in_process"] = lambda seed: self.pipeline([self.request(seed)])
        if "diffusers" in wanted:
            self.calls["diffusers"] = self._diffusers()
        if needs_stack:
            from ember.serve import Stack, build_artifacts

            build_artifacts(settings, progress=False)
            self.stack = Stack(settings, env=self.env)
            self.stack.start(timeout=600)
            if "gateway" in wanted:
                self.calls["gateway"] = self._fal_client()
            self.triton = _triton_client()
            if "triton_grpc" in wanted:
                self.calls["triton_grpc"] = lambda seed: asyncio.run(self.grpc(seed))

    def _diffusers(self) -> Callable[[int], Any]:
        """The baseline: diffusers' LatentConsistencyModelPipeline, eager torch, on the same weights."""
        import torch
        from diffusers import LatentConsistencyModelPipeline

        source = self.settings.model_source("lcm", "sdv1-5")
        pipe = LatentConsistencyModelPipeline.from_pretrained(
            source, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
        )
        pipe.set_progress_bar_config(disable=True)
        self.diffusers_pipe = pipe
        p = self.preset

        def call(seed: int) -> Any:
            return pipe(
                p["prompt"],
                num_inference_steps=p["num_inference_steps"],
                guidance_scale=p["guidance_scale"],
                width=p["width"],
                height=p["height"],
                num_images_per_prompt=p["num_images"],
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
            )

        return call

    def _fal_client(self) -> Callable[[int], Any]:
        """fal_client.run against the gateway's run host: the official client reads its hosts at import."""
        os.environ.update(self.stack.client_env())
        for name in [m for m in sys.modules if m == "fal_client" or m.startswith("fal_client.")]:
            del sys.modules[name]
        import fal_client

        client = fal_client.SyncClient(key=self.stack.api_key())
        p = self.preset
        arguments = {
            "prompt": p["prompt"],
            "num_inference_steps": p["num_inference_steps"],
            "guidance_scale": p["guidance_scale"],
            "num_images": p["num_images"],
            "image_size": {"width": p["width"], "height": p["height"]},
            "enable_safety_checks": False,
        }
        return lambda seed: client.run(p["endpoint"], arguments={**arguments, "seed": seed})

    async def grpc(self, seed: int) -> Any:
        p = self.preset
        return await self.triton.generate(
            self.env["EMBER_TRITON_GRPC_URL"],
            p["prompt"],
            seed,
            p["num_inference_steps"],
            p["width"],
            p["height"],
        )

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()


def measure_latency(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    names = [n for n in preset["paths"] if n in paths.calls]
    for name in names:
        for i in range(preset["warmup"]):
            paths.calls[name](1000 + i)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(preset["repeats"]):  # interleaved: one request per path per round
        for name in names:
            start = time.perf_counter()
            paths.calls[name](preset["seed"] + round_)
            times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


async def _concurrent(paths: Paths, concurrency: int, total: int) -> float:
    """Seconds for `total` requests with at most `concurrency` in flight through Triton gRPC."""
    gate = asyncio.Semaphore(concurrency)

    async def one(seed: int) -> None:
        async with gate:
            await paths.grpc(seed)

    start = time.perf_counter()
    await asyncio.gather(*(one(7000 + i) for i in range(total)))
    return time.perf_counter() - start


def measure_throughput(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    """Images/s at each concurrency through Triton (dynamic batching), when the stack runs."""
    if paths.stack is None:
        return {}
    out = {}
    for c in preset["concurrency"]:
        total = c * preset["rounds"]
        asyncio.run(_concurrent(paths, c, c))  # warm the batch shapes of this concurrency
        seconds = asyncio.run(_concurrent(paths, c, total))
        out[str(c)] = {
            "requests": total,
            "seconds": seconds,
            "images_per_s": total * preset["num_images"] / seconds,
        }
    return out


def measure_batch_gain(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    """In process, no server: one pipeline call of n requests vs n calls of one (same seeds)."""
    n = preset["batch_gain_at"]
    requests = [paths.request(9000 + i) for i in range(n)]
    paths.pipeline(requests[:1])  # warm-up
    paths.pipeline(requests)
    start = time.perf_counter()
    for r in requests:
        paths.pipeline([r])
    singles = time.perf_counter() - start
    start = time.perf_counter()
    paths.pipeline(requests)
    batched = time.perf_counter() - start
    return {"requests": n, "sequential_s": singles, "batched_s": batched, "gain": singles / batched}


def count_pipeline_flops(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one request, counted on the diffusers pipeline (torch, same weights and shapes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pipe = getattr(paths, "diffusers_pipe", None)
    if pipe is None:
        return {}
    with FlopCounterMode(display=False) as counter:
        paths.calls["diffusers"](preset["seed"])
    per_module = {
        str(k): int(sum(v.values()))
        for k, v in counter.get_flop_counts().items()
        if k.count(".") == 0 and k != "Global"
    }
    out: dict[str, Any] = {"total": int(counter.get_total_flops()), "by_module": per_module}
    if torch.cuda.is_available():
        from benchmarks.flops import peak_tflops

        peak = peak_tflops(torch.cuda.get_device_name())
        if peak:
            out["ideal_s"] = out["total"] / (peak * 1e12)
            out["peak_tflops"] = peak
    return out


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def run(preset: dict[str, Any], out_dir: Path, var_dir: Path) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    report: dict[str, Any] = {
        "preset": preset["name"],
        "started": started,
        "machine": machine(),
        "settings": {k: v for k, v in preset.items() if k != "name"},
    }
    paths = Paths(preset, var_dir)
    try:
        paths.open()
        report["latency"] = measure_latency(paths, preset)
        report["throughput"] = measure_throughput(paths, preset)
        if "batch_gain_at" in preset:
            report["batch_gain"] = measure_batch_gain(paths, preset)
        report["flops"] = count_pipeline_flops(paths, preset)
    finally:
        paths.close()
    if preset.get("ort_vs_torch"):
        from benchmarks.ort_vs_torch import compare

        report["ort_vs_torch"] = compare(var_dir / "bench", **preset["ort_vs_torch"])
    report["ratios"] = ratios(report)
    report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    from benchmarks.report import write_report

    write_report(report, out_dir)
    return report


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """The targets of the issue, as measured in this run (p50 over p50)."""
    lat = {k: v["p50_s"] for k, v in report.get("latency", {}).items()}
    out: dict[str, Any] = {}
    if "gateway" in lat and "triton_grpc" in lat:
        out["gateway_over_triton"] = {"value": lat["gateway"] / lat["triton_grpc"], "target_max": 1.10}
    if "triton_grpc" in lat and "in_process" in lat:
        out["triton_over_in_process"] = {"value": lat["triton_grpc"] / lat["in_process"], "target_max": 1.05}
    if "diffusers" in lat and "in_process" in lat:
        out["diffusers_over_in_process"] = {"value": lat["diffusers"] / lat["in_process"]}
    if "ort_vs_torch" in report:
        out["ort_speedup_over_torch"] = {
            "value": report["ort_vs_torch"]["speedup_ort_over_torch"],
            "target_min": 1.5,
        }
    tp = report.get("throughput", {})
    gain_at = str(report["settings"].get("batch_gain_at"))
    if gain_at in tp and "1" in tp:
        out["served_throughput_gain"] = {
            "value": tp[gain_at]["images_per_s"] / tp["1"]["images_per_s"],
            "concurrency": int(gain_at),
        }
    if "batch_gain" in report:
        out["in_process_batch_gain"] = {
            "value": report["batch_gain"]["gain"],
            "requests": report["batch_gain"]["requests"],
        }
    for entry in out.values():
        if "target_max" in entry:
            entry["met"] = entry["value"] <= entry["target_max"]
        if "target_min" in entry:
            entry["met"] = entry["value"] >= entry["target_min"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lcm_demo")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON/MD/PNG go")
    parser.add_argument(
        "--var-dir",
        type=Path,
        help="models, exports and server state (default: a temp dir "
        "for servers + var/ for the cached full-size UNet)",
    )
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    var_dir = args.var_dir or Path(tempfile.mkdtemp(prefix="ember-bench-"))
    if args.var_dir is None:  # the full-size UNet and its export are worth keeping between runs
        (var_dir / "bench").symlink_to((REPO / "var" / "bench").resolve(), target_is_directory=True)
        (REPO / "var" / "bench").mkdir(parents=True, exist_ok=True)
    report = run(preset, args.out, var_dir)
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {args.out / preset['name']}.json, .md, .png")


if __name__ == "__main__":
    main()
