"""The torch runtime on CUDA: compiled + graphed runners agree with eager, and the one-call GPU benchmark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compiled_runner_matches_eager_fp16(lcm_artifacts, mode: str) -> None:
    from ember.runtime.torch_runner import TorchRunner
    from ember.specs.sd15 import UNET

    feeds = UNET.sample_inputs(lcm_artifacts.config("unet"), batch=2, height=64, width=96)
    eager = TorchRunner(UNET, lcm_artifacts.source, None, "cuda", torch.float16).run(feeds)["noise_pred"]
    fast = TorchRunner(
        UNET, lcm_artifacts.source, None, "cuda", torch.float16, compile_mode=mode, warmup=[(2, 64, 96)]
    )
    first, second = fast.run(feeds)["noise_pred"], fast.run(feeds)["noise_pred"]  # second: graph replay
    assert torch.equal(first, second)
    assert (first - eager).abs().max() < 2e-2 * eager.std()  # fp16 kernels differ (fusion, tactics)


def test_gpu_benchmark_in_one_call(tmp_path: Path) -> None:
    """The full-size benchmark (benchmarks/NOTES.md). Minutes on an H100; RUN_GPU_BENCH=1 also writes the
    results into benchmarks/results/."""
    from benchmarks import gpu

    out = Path("benchmarks/results") if os.environ.get("RUN_GPU_BENCH") == "1" else tmp_path
    report = gpu.main(["--out", str(out)])
    for case in report["cases"].values():
        assert case["pipeline_s"]["ember_torch"] > 0 and case["peak_memory_gib"] > 0
