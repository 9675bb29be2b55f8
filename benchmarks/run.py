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
import dataclasses
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


def override(preset: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """The preset with `KEY=VALUE` assignments applied (VALUE parsed as JSON, else taken as a string)."""
    preset = {**preset, "arguments": dict(preset["arguments"]), "overrides": list(assignments)}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if isinstance(value, list):
            value = tuple(value)
        if key.startswith("arguments."):
            preset["arguments"][key.removeprefix("arguments.")] = value
        elif key in preset:
            preset[key] = value
        else:
            raise SystemExit(f"--set {key}: the preset has no such value; known: {sorted(preset)}")
    return preset


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


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _never() -> bool:
    return False


def _ignore(*args: Any) -> None:
    return None


def _request_summary(item: Any) -> dict[str, Any]:
    """The resolved request's plain fields (size, steps, guidance, scheduler...), for the report."""
    plain = (int, float, str, bool, type(None))
    return {
        f.name: getattr(item, f.name)
        for f in dataclasses.fields(item)
        if isinstance(getattr(item, f.name), plain) and f.name not in ("prompt", "negative_prompt", "seed")
    }


class Paths:
    """The request paths being compared, each a callable(seed) that runs one request.

    Every path runs the same fal request (the preset's `arguments`, fal's defaults for the rest): the gateway
    path sends it with the official fal client; the others take the Triton tensors the gateway's translation
    builds from it (`Endpoint.to_triton`): sent over gRPC by client/triton_grpc.py (`triton_grpc`), or parsed
    and run in this process by the very EndpointModel the Triton model builds (`in_process`). The diffusers
    baseline runs the parsed request (benchmarks/baselines.py)."""

    def __init__(self, preset: dict[str, Any], var_dir: Path):
        self.preset = preset
        self.var_dir = var_dir
        self.stack: Any = None
        self.env: dict[str, str] = {}
        self.calls: dict[str, Callable[[int], Any]] = {}
        self.model: Any = None

    def tensors(self, seed: int) -> dict[str, Any]:
        """The Triton model's input tensors for the preset's request with this seed."""
        return self.endpoint.to_triton(self.inp, seed, self.loaded)

    def item(self, seed: int) -> Any:
        """The request as the Triton model parses it (needs self.model)."""
        return self.model.parse(self.tensors(seed), self.model.defaults, _never)

    def run_items(self, items: list[Any]) -> list[Any]:
        """One call of the endpoint's pipeline, as the Triton model makes it; a refused request raises."""
        extra = () if self.model.log_arrays is None else (_ignore,)
        results = self.model.pipeline(items, _ignore, *extra)
        for result in results:
            if getattr(result, "error", None):
                raise RuntimeError(f"{self.endpoint.endpoint_id}: {result.error}")
        return results

    def open(self) -> None:
        from ember.endpoints.registry import ENDPOINTS
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
        self.metrics_url = f"http://127.0.0.1:{t_metrics}/metrics"
        self.endpoint = ENDPOINTS[self.preset["endpoint"]]
        if needs_stack:
            from ember.serve import build_artifacts

            build_artifacts(settings, progress=False)
        prepare = self.preset.get("prepare")
        self.arguments = dict(self.preset["arguments"])
        if prepare is not None:  # e.g. a base model for fal-ai/lora, a control image for illusion-diffusion
            self.arguments = prepare(settings, self.arguments)
        self.inp = self.endpoint.input_model(**self.arguments)
        self.loaded = asyncio.run(_load(self.endpoint, self.inp, var_dir=self.var_dir))
        if any(p in wanted for p in ("in_process", "diffusers")) or "batch_gain_at" in self.preset:
            from ember.pipeline.serving_models import endpoint_model

            self.model = endpoint_model(self.endpoint.triton_model, settings)
            self.request = _request_summary(self.item(self.preset["seed"]))
        if "in_process" in wanted:
            self.calls["in_process"] = lambda seed: self.run_items([self.item(seed)])
        if "diffusers" in wanted:
            from benchmarks.baselines import baseline

            self.diffusers_pipe, self.calls["diffusers"] = baseline(
                self.endpoint.endpoint_id, settings, self.item(self.preset["seed"])
            )
        if needs_stack:
            from ember.serve import Stack

            self.stack = Stack(settings, env=self.env)
            self.stack.start(timeout=600)
            if "gateway" in wanted:
                self.calls["gateway"] = self._fal_client()
            self.triton = _triton_client()
            if "triton_grpc" in wanted:
                self.calls["triton_grpc"] = lambda seed: asyncio.run(self.grpc(seed))

    def _fal_client(self) -> Callable[[int], Any]:
        """fal_client.run against the gateway's run host: the official client reads its hosts at import."""
        os.environ.update(self.stack.client_env())
        for name in [m for m in sys.modules if m == "fal_client" or m.startswith("fal_client.")]:
            del sys.modules[name]
        import fal_client

        client = fal_client.SyncClient(key=self.stack.api_key())
        endpoint_id = self.endpoint.endpoint_id
        return lambda seed: client.run(endpoint_id, arguments={**self.arguments, "seed": seed})

    async def grpc(self, seed: int) -> Any:
        return await self.triton.infer(
            self.env["EMBER_TRITON_GRPC_URL"], self.endpoint.triton_model, self.tensors(seed), f"bench-{seed}"
        )

    def triton_gpu_memory(self) -> int | None:
        """Bytes of GPU memory in use as Triton's metrics report it (None without a GPU or a stack)."""
        if self.stack is None:
            return None
        import httpx

        try:
            text = httpx.get(self.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return None
        used = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("nv_gpu_memory_used_bytes")
        ]
        return int(sum(used)) if used else None

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()


async def _load(endpoint: Any, inp: Any, var_dir: Path) -> Any:
    """What the endpoint fetches by URL before translating (images, weight files), through the gateway's own
    loader and SSRF-safe fetcher: presets pass data: URIs or public URLs."""
    from ember.gateway.fetcher import Fetcher
    from ember.gateway.files import FileStore
    from ember.gateway.inputs import GatewayMedia

    fetcher = Fetcher()
    try:
        files = FileStore(var_dir / "bench-files", "http://127.0.0.1/files")
        media = GatewayMedia(fetcher, files, (), max_image_bytes=50 * 2**20, max_weights_bytes=2**31)
        return await endpoint.load(inp, media)
    finally:
        await fetcher.close()


def measure_latency(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    """p50/p95 per path; on a GPU also each in-process path's peak memory (torch.cuda.max_memory_allocated
    around its own calls: the ember pipeline and the diffusers baseline share this process)."""
    import torch

    cuda = torch.cuda.is_available()
    names = [n for n in preset["paths"] if n in paths.calls]
    for name in names:
        for i in range(preset["warmup"]):
            paths.calls[name](1000 + i)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    for round_ in range(preset["repeats"]):  # interleaved: one request per path per round
        _log(f"latency round {round_ + 1}/{preset['repeats']}: {', '.join(names)}")
        for name in names:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            paths.calls[name](preset["seed"] + round_)
            times[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
    out = {name: summarize(t) for name, t in times.items()}
    if cuda:
        for name in ("in_process", "diffusers"):
            if name in out:
                out[name]["peak_gpu_memory_bytes"] = peaks[name]
    return out


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
        _log(f"throughput at concurrency {c}: {total} requests after {c} untimed")
        asyncio.run(_concurrent(paths, c, c))  # warm the batch shapes of this concurrency
        seconds = asyncio.run(_concurrent(paths, c, total))
        out[str(c)] = {
            "requests": total,
            "seconds": seconds,
            "images_per_s": total * getattr(paths.inp, "num_images", 1) / seconds,
        }
    return out


def first_image(path: str, output: Any) -> Any:
    """The first image a path returned, as (H, W, 3) uint8 numpy."""
    import numpy as np

    if path == "in_process":
        result = output[0]
        image = result.images[0] if hasattr(result, "images") else result.image
        return image.numpy()
    if path == "triton_grpc":
        images = output["outputs"]["IMAGES"]
        return images.reshape(-1, *images.shape[-3:])[0]
    if path == "diffusers":
        images = np.asarray(output.images)
        return np.round(images[0] * 255).astype(np.uint8)
    raise ValueError(path)


def measure_agreement(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    """That every path does the same work: one seed's first image from each path, against the in-process
    pipeline's, in 8-bit levels (max and mean absolute difference). Triton runs the same code on the same
    tensors (expect 0); diffusers is the parity reference (expect 0 on torch, about 1 on ONNX Runtime)."""
    import numpy as np

    if "in_process" not in paths.calls:
        return {}
    seed = preset["seed"]
    reference = first_image("in_process", paths.calls["in_process"](seed)).astype(np.int16)
    out = {}
    for name in ("triton_grpc", "diffusers"):
        if name in paths.calls:
            output = paths.calls[name](seed)
            image = first_image(name, output).astype(np.int16)
            if image.shape != reference.shape:
                out[name] = {"shape": list(image.shape), "expected_shape": list(reference.shape)}
                continue
            diff = np.abs(image - reference)
            out[name] = {"max_levels": int(diff.max()), "mean_levels": float(diff.mean())}
            if name == "triton_grpc":  # the [step, total] progress responses the client got
                out[name]["progress"] = output["progress"]
    return out


def measure_batch_gain(paths: Paths, preset: dict[str, Any]) -> dict[str, Any]:
    """In process, no server: one pipeline call of n requests vs n calls of one (same seeds)."""
    n = preset["batch_gain_at"]
    _log(f"in-process batching: {n} requests one by one, then as one batch")
    requests = [paths.item(9000 + i) for i in range(n)]
    paths.run_items(requests[:1])  # warm-up
    paths.run_items(requests)
    start = time.perf_counter()
    for r in requests:
        paths.run_items([r])
    singles = time.perf_counter() - start
    start = time.perf_counter()
    paths.run_items(requests)
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
        "settings": {k: v for k, v in preset.items() if k != "name" and not callable(v)},
    }
    paths = Paths(preset, var_dir)
    try:
        _log(f"{preset['name']}: loading the paths {', '.join(preset['paths'])}")
        paths.open()
        report["latency"] = measure_latency(paths, preset)
        report["agreement"] = measure_agreement(paths, preset)
        report["throughput"] = measure_throughput(paths, preset)
        if "batch_gain_at" in preset:
            report["batch_gain"] = measure_batch_gain(paths, preset)
        report["flops"] = count_pipeline_flops(paths, preset)
        report["request"] = {"arguments": paths.arguments, "resolved": getattr(paths, "request", {})}
        memory = paths.triton_gpu_memory()
        if memory is not None:  # after the throughput run: what Triton's models hold at their peak batch
            report["triton_gpu_memory_bytes"] = memory
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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value (VALUE in JSON, else a string); arguments.FIELD sets one fal input, "
        "e.g. --set repeats=3 --set arguments.image_size='\"square\"'. The report lists the overrides.",
    )
    args = parser.parse_args(argv)
    preset = override(load_preset(args.preset), args.set)
    var_dir = args.var_dir or Path(tempfile.mkdtemp(prefix="ember-bench-"))
    if args.var_dir is None:  # the full-size UNet and its export are worth keeping between runs
        (var_dir / "bench").symlink_to((REPO / "var" / "bench").resolve(), target_is_directory=True)
        (REPO / "var" / "bench").mkdir(parents=True, exist_ok=True)
    report = run(preset, args.out, var_dir)
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {args.out / preset['name']}.json, .md, .png")


if __name__ == "__main__":
    main()
