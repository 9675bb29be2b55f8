"""ONNX Runtime vs torch eager on the CPU, on the full-size SD1.5 (LCM Dreamshaper v7) UNet, random weights.

The UNet is ~97% of an SD1.5 LCM request's FLOPs, so it decides the comparison. It is built once from the real
config (benchmarks/archs.py), saved in diffusers format and loaded back through the spec's own loader
(ember.specs.sd15.UNET), exported by ember's exporter (verified against torch), and run by ember's
OnnxRuntimeRunner and TorchRunner: the same code that serves.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import archs


def prepare(cache: Path, scale: float = 1.0, progress: bool = True) -> tuple[Path, Path]:
    """(diffusers directory, ONNX path) of the random-weight UNet; built on first use, then reused."""
    from diffusers import UNet2DConditionModel

    from ember.specs.onnx_export import export_onnx
    from ember.specs.sd15 import UNET

    source = cache / f"sd15-lcm-unet-x{scale:g}"
    onnx_path = source / "onnx" / "unet.onnx"
    if not (source / "unet" / "config.json").is_file():
        torch.manual_seed(0)
        config = archs.shrink(archs.SD15_LCM_UNET, scale)
        if progress:
            print(f"[bench] building the random-weight SD1.5 LCM UNet (scale {scale:g}) into {source}")
        UNet2DConditionModel.from_config(config).save_pretrained(source / "unet")
    if not onnx_path.is_file():
        if progress:
            print(f"[bench] exporting {onnx_path} (minutes at full size on a shared CPU)")
        module = UNET.load(str(source), None, torch.float32)
        export_onnx(UNET, module, dict(module.config), onnx_path)
        del module
    return source, onnx_path


def _time(run: Any, feeds: dict[str, torch.Tensor], repeats: int) -> list[float]:
    run(feeds)  # untimed: the other runtime's threads may still be spinning, and first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - start)
    return times


def compare(
    cache: Path,
    height: int,
    width: int,
    batch: int,
    repeats: int,
    scale: float = 1.0,
    threads: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """Median seconds per UNet call for both runtimes at each thread count (0 = every visible core, the
    serving configuration), interleaved call by call so a shared machine affects both alike."""
    from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner, _cpu_threads
    from ember.runtime.torch_runner import TorchRunner
    from ember.specs.sd15 import UNET

    source, onnx_path = prepare(cache, scale)
    torch_runner = TorchRunner(UNET, str(source), None, "cpu", torch.float32)
    config = dict(torch_runner._module.config)
    feeds = UNET.sample_inputs(config, batch, height, width, seed=0)
    flops = count_unet_flops(torch_runner._module, feeds)
    by_threads: dict[str, Any] = {}
    for n in threads:
        n = n or _cpu_threads()
        torch.set_num_threads(n)
        ort_runner = OnnxRuntimeRunner(UNET, onnx_path, intra_op_threads=n)
        diff = float(
            (torch_runner.run(feeds)["noise_pred"] - ort_runner.run(feeds)["noise_pred"]).abs().max()
        )
        torch_times: list[float] = []
        ort_times: list[float] = []
        for _ in range(repeats):
            torch_times += _time(torch_runner.run, feeds, 1)
            ort_times += _time(ort_runner.run, feeds, 1)
        t, o = statistics.median(torch_times), statistics.median(ort_times)
        by_threads[str(n)] = {
            "torch_eager_s": {"median": t, "all": torch_times},
            "onnxruntime_s": {"median": o, "all": ort_times},
            "speedup_ort_over_torch": t / o,
            "max_abs_diff": diff,
            "torch_gflops_per_s": flops / t / 1e9,
            "onnxruntime_gflops_per_s": flops / o / 1e9,
        }
        del ort_runner
    torch.set_num_threads(_cpu_threads())
    serving = (
        by_threads[str(_cpu_threads())]
        if str(_cpu_threads()) in by_threads
        else next(iter(by_threads.values()))
    )
    return {
        "network": "SD1.5 LCM UNet (random weights, real config)",
        "parameters": archs.parameters(torch_runner._module),
        "shape": {"batch": batch, "height": height, "width": width},
        "flops_per_call": flops,
        "by_threads": by_threads,
        # The serving configuration (all visible cores) is the headline figure.
        "speedup_ort_over_torch": serving["speedup_ort_over_torch"],
    }


def count_unet_flops(module: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> int:
    from benchmarks.flops import count_flops

    return count_flops(
        module, [feeds[n] for n in ("sample", "timestep", "encoder_hidden_states", "timestep_cond")]
    )
