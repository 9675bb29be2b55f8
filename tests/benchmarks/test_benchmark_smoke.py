"""The benchmark runners end to end at tiny sizes: every part runs and the report files are written.
No timing is asserted (this machine is shared); the numbers of a smoke run mean nothing."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu
from benchmarks.run import load_preset, percentile, run


def test_percentile_matches_numpy_linear() -> None:
    values = [0.3, 0.1, 0.2, 0.4]
    assert percentile(values, 50) == 0.25
    assert abs(percentile(values, 95) - 0.385) < 1e-12


def test_smoke_preset_writes_json_markdown_and_plot(var_dir: Path, tmp_path: Path) -> None:
    preset = load_preset("smoke")
    report = run(preset, tmp_path, var_dir)
    assert set(report["latency"]) == {"in_process", "diffusers"}
    assert report["batch_gain"]["requests"] == preset["batch_gain_at"]
    assert report["flops"]["total"] > 0 and "UNet2DConditionModel" in report["flops"]["by_module"]
    (by_threads,) = report["ort_vs_torch"]["by_threads"].values()
    assert by_threads["max_abs_diff"] < 1e-3  # ORT and torch agree on the scaled-down UNet
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["ratios"] == json.loads(json.dumps(report["ratios"]))
    assert "## Latency" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_benchmark_code_path_on_cpu(tmp_path: Path) -> None:
    report = gpu.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--iters",
            "1",
            "--batches",
            "",
            "--cases",
            "lcm_sd15_512_4steps",
            "--out",
            str(tmp_path),
        ]
    )
    case = report["cases"]["lcm_sd15_512_4steps"]
    assert set(case["networks"]) == {"text_encoder", "unet", "vae_decoder"}
    assert case["networks"]["unet"]["calls"] == 4 and case["flops"] > 0
    assert (tmp_path / "gpu-cpu-tiny.md").is_file() and "sdxl_batched" not in report
