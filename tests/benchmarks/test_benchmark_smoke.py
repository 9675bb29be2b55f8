"""The benchmark runners end to end at tiny sizes: every part runs and the report files are written.
No timing is asserted (this machine is shared); the numbers of a smoke run mean nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import gpu
from benchmarks.run import load_preset, override, percentile, run

# Each endpoint's preset (fal's defaults) shrunk to seconds on CPU: the same runner code, tiny sizes.
SHRUNK = {
    "lora_demo": ['arguments.image_size={"width":64,"height":64}', "arguments.num_inference_steps=3"],
    "pixart_sigma_demo": [
        'arguments.image_size={"width":128,"height":128}',
        "arguments.num_inference_steps=5",
    ],
    "sote_diffusion_demo": [
        'arguments.image_size={"width":256,"height":384}',
        "arguments.first_stage_steps=4",
        "arguments.second_stage_steps=4",
    ],
    "illusion_diffusion_demo": [
        'arguments.image_size={"width":64,"height":64}',
        "arguments.num_inference_steps=3",
    ],
}
IN_PROCESS = ['paths=["in_process", "diffusers"]', "warmup=0", "repeats=1", "batch_gain_at=2"]


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


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_each_endpoint_preset_runs_the_triton_models_code_and_matches_diffusers(
    name: str, var_dir: Path, tmp_path: Path
) -> None:
    """The runner serves every endpoint: the request is parsed and run by the EndpointModel its Triton model
    builds, the diffusers baseline gets the same resolved request, and both give the same image."""
    preset = override(load_preset(name), [*SHRUNK[name], *IN_PROCESS])
    report = run(preset, tmp_path, var_dir)
    assert set(report["latency"]) == {"in_process", "diffusers"}
    resolved = report["request"]["resolved"]
    size = json.loads(SHRUNK[name][0].split("=", 1)[1])
    assert (resolved["width"], resolved["height"]) == (size["width"], size["height"])
    # torch on both sides (illusion's and lora's base run torch; pixart's and sote's ONNX Runtime: 1 level)
    assert report["agreement"]["diffusers"]["max_levels"] <= 1
    assert report["batch_gain"]["requests"] == 2 and report["flops"]["total"] > 0
    markdown = (tmp_path / f"{name}.md").read_text()
    assert "## Same work on every path" in markdown and "Preset overrides for this run" in markdown


def test_served_paths_run_through_the_gateway_and_triton(
    var_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All four paths of one endpoint besides lcm, with its own stack (gateway + Triton) on fresh ports: the
    fal client and the generic gRPC client (client/triton_grpc.py `infer`) reach the pixart_sigma model, and
    Triton returns exactly the in-process image for the same seed. This stack coalesces progress
    (EMBER_PROGRESS_INTERVAL_MS far above the request's length): only the first and last steps are sent."""
    monkeypatch.setenv("EMBER_PROGRESS_INTERVAL_MS", "600000")
    bench_var = tmp_path / "var"
    bench_var.mkdir()
    for shared in ("models", "export"):  # the session's demo models and exports, reused (keyed by content)
        (var_dir / shared).mkdir(exist_ok=True)
        os.symlink(var_dir / shared, bench_var / shared)
    preset = override(
        load_preset("pixart_sigma_demo"),
        [*SHRUNK["pixart_sigma_demo"], "warmup=0", "repeats=1", "concurrency=[1, 2]", "batch_gain_at=2"],
    )
    report = run(preset, tmp_path / "out", bench_var)
    assert set(report["latency"]) == {"gateway", "triton_grpc", "in_process", "diffusers"}
    agreement = report["agreement"]["triton_grpc"]
    assert (agreement["max_levels"], agreement["mean_levels"]) == (0, 0.0)
    assert agreement["progress"] == [[1, 5], [5, 5]]
    assert set(report["throughput"]) == {"1", "2"}
    assert {"gateway_over_triton", "triton_over_in_process", "served_throughput_gain"} <= set(
        report["ratios"]
    )
