"""A benchmark report as files: <name>.json (everything), <name>.md (the tables), <name>.png (the plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH_LABELS = {
    "gateway": "gateway end to end (fal-client)",
    "triton_grpc": "Triton gRPC direct",
    "in_process": "ember pipeline in process",
    "diffusers": "diffusers pipeline (baseline)",
}


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _request_line(request: dict[str, Any]) -> str:
    """A line like `1024x1024, 35 steps, guidance 4.5, scheduler DPM-SOLVER` from the request as parsed."""
    r = dict(request.get("resolved", {}))
    if (
        r.get("image") is None
    ):  # text-to-image: the image-to-image fields its request class carries mean nothing
        for name in ("image", "mask", "strength", "inpaint_mask_only", "controlnet_inpaint"):
            r.pop(name, None)
    if "style" in r or "second_stage_steps" in r:  # fal-ai/lcm's `model`, inherited by these request classes
        r.pop("model", None)
    parts = []
    if "width" in r and "height" in r:
        parts.append(f"{r.pop('width')}x{r.pop('height')}")
    if "num_inference_steps" in r:
        parts.append(f"{r.pop('num_inference_steps')} steps")
    if "guidance_scale" in r:
        parts.append(f"guidance {r.pop('guidance_scale')}")
    parts += [f"{k} {v}" for k, v in r.items() if v not in (None, False, "", 0)]
    return ", ".join(parts) + " (fal's defaults but for the preset's `arguments`)."


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"# Benchmark `{report['preset']}` ({report['started']})",
        "",
        (
            f"Machine: {m['platform']}, {m['cpus_visible']} CPUs visible, GPU: {m['gpu'] or 'none'}; torch "
            f"{m['torch']}, onnxruntime {m.get('onnxruntime', '-')}. Load average at start/end: "
            f"{m['load_avg_1m_at_start']:.1f} / {m.get('load_avg_1m_at_end', float('nan')):.1f} "
            "(other processes share this machine: compare ratios measured in this run, not absolute times)."
        ),
        "",
        f"Request: {s['endpoint']} `{s['weights']}` weights, " + _request_line(report.get("request", {})),
        "",
        *(
            [f"Preset overrides for this run: {', '.join(f'`{o}`' for o in s['overrides'])}.", ""]
            if s.get("overrides")
            else []
        ),
    ]
    if report.get("latency"):
        lines += [
            "## Latency",
            "",
            "| path | p50 ms | p95 ms | n | peak GPU memory |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, v in report["latency"].items():
            memory = _gib(v.get("peak_gpu_memory_bytes"))
            lines.append(
                f"| {PATH_LABELS.get(name, name)} | {_ms(v['p50_s'])} | {_ms(v['p95_s'])} | {v['n']} | {memory} |"
            )
        if report.get("triton_gpu_memory_bytes") is not None:
            lines.append(
                f"\nTriton's GPU memory in use after the throughput run: {_gib(report['triton_gpu_memory_bytes'])}."
            )
        lines.append("")
    if report.get("agreement"):
        lines += [
            "## Same work on every path",
            "",
            "One seed's image from each path against the in-process pipeline's (8-bit levels):",
            "",
            "| path | max | mean |",
            "|---|---:|---:|",
        ]
        for name, v in report["agreement"].items():
            if "max_levels" in v:
                lines.append(
                    f"| {PATH_LABELS.get(name, name)} | {v['max_levels']} | {v['mean_levels']:.3f} |"
                )
            else:
                lines.append(
                    f"| {PATH_LABELS.get(name, name)} | shape {v['shape']} vs {v['expected_shape']} | - |"
                )
        lines.append("")
    if report.get("ratios"):
        lines += ["## Targets", "", "| ratio | measured | target | met |", "|---|---:|---|---|"]
        for name, v in report["ratios"].items():
            target = (
                f"<= {v['target_max']}"
                if "target_max" in v
                else f">= {v['target_min']}"
                if "target_min" in v
                else "-"
            )
            met = {True: "yes", False: "**no**"}.get(v.get("met"), "-")
            lines.append(f"| {name} | {v['value']:.3f} | {target} | {met} |")
        lines.append("")
    if report.get("throughput"):
        lines += [
            "## Throughput through Triton (dynamic batching)",
            "",
            "| concurrency | requests | seconds | images/s |",
            "|---:|---:|---:|---:|",
        ]
        for c, v in report["throughput"].items():
            lines.append(f"| {c} | {v['requests']} | {v['seconds']:.2f} | {v['images_per_s']:.2f} |")
        lines.append("")
    if report.get("batch_gain"):
        b = report["batch_gain"]
        lines += [
            "## Batching in process",
            "",
            (
                f"{b['requests']} requests: {b['sequential_s']:.2f} s one by one, {b['batched_s']:.2f} s as "
                f"one batch: **{b['gain']:.2f}x**."
            ),
            "",
        ]
    if report.get("ort_vs_torch"):
        o = report["ort_vs_torch"]
        lines += [
            "## ONNX Runtime vs torch eager (CPU, fp32)",
            "",
            (
                f"{o['network']}, {o['parameters'] / 1e6:.1f}M parameters, batch {o['shape']['batch']} at "
                f"{o['shape']['height']}x{o['shape']['width']} px; {o['flops_per_call'] / 1e9:.1f} GFLOP per call."
            ),
            "",
            (
                "| threads | torch eager s/call | onnxruntime s/call | speed-up | torch GFLOP/s | ORT GFLOP/s "
                "| max abs diff |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, v in o["by_threads"].items():
            lines.append(
                f"| {n} | {v['torch_eager_s']['median']:.3f} | {v['onnxruntime_s']['median']:.3f} | "
                f"{v['speedup_ort_over_torch']:.2f}x | {v['torch_gflops_per_s']:.1f} | "
                f"{v['onnxruntime_gflops_per_s']:.1f} | {v['max_abs_diff']:.1e} |"
            )
        lines.append("")
    if report.get("flops"):
        f = report["flops"]
        lines += [
            "## FLOPs per request (FlopCounterMode on the diffusers pipeline)",
            "",
            f"Total {f['total'] / 1e9:.2f} GFLOP: "
            + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f["by_module"].items())
            + ".",
        ]
        if "ideal_s" in f:
            lines.append(f"Ideal time at {f['peak_tflops']} TFLOP/s: {_ms(f['ideal_s'])} ms.")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("latency", "throughput") if report.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "latency":
            names = list(report["latency"])
            p50 = [report["latency"][n]["p50_s"] * 1000 for n in names]
            p95 = [report["latency"][n]["p95_s"] * 1000 for n in names]
            x = range(len(names))
            ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
            ax.bar([i + 0.2 for i in x], p95, width=0.4, label="p95")
            ax.set_xticks(list(x), [n.replace("_", " ") for n in names], rotation=15)
            ax.set_ylabel("ms per request")
            ax.set_title("latency")
            ax.legend()
        else:
            tp = report["throughput"]
            cs = [int(c) for c in tp]
            ax.plot(cs, [tp[str(c)]["images_per_s"] for c in cs], marker="o")
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel("images / s")
            ax.set_title("throughput through Triton")
    fig.suptitle(f"{report['preset']} ({report['started']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / report["preset"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
