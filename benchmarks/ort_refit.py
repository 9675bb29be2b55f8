"""LoRA refit on ONNX Runtime, full-size SD1.5 (LCM Dreamshaper v7) UNet with random weights, 256 x 256 px.

    python -m benchmarks.ort_refit            # writes benchmarks/results/ort_refit.json, prints a table

Compares the two ways ORT can take new weights without re-exporting:

- overridable initializers (what ember.runtime.onnxruntime_runner does): the refit map's weights are graph
  inputs backed by their initializers; a LoRA set is fed as arrays on every run. Switch = LoraState merge +
  a dict update; cost per run = what ORT cannot do with non-constant weights (prepacking MatMul weights);
- one session per set with `SessionOptions.add_initializer`: constant weights as before, but a LoRA switch
  builds a new session (graph optimization and prepacking of the whole UNet again).

The LoRA: random rank-8 factors on every attention projection (to_q/k/v/out.0: 128 weights, a typical
style LoRA). Runs are interleaved call by call, so load from other processes hits every path alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.ort_vs_torch import prepare

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _random_lora(weights: Any, seed: int, rank: int = 8) -> Any:
    """A LoraFile over the UNet's attention projections, shapes read from the ONNX (nothing loaded)."""
    from ember.pipeline.loras import LoraFile

    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for key, entry in weights.map.items():
        if key.endswith(TARGETS):
            shape = weights.shape(entry["onnx"])
            out_dim, in_dim = (shape[1], shape[0]) if entry["transpose"] else shape[:2]
            up = torch.randn(out_dim, rank, generator=generator) * 0.01
            down = torch.randn(rank, in_dim, generator=generator) * 0.01
            factors[key] = (up, down, 1.0)
    return LoraFile(digest=f"random-{seed}", factors={"unet": factors})


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _overridable(
    onnx_path: Path,
    refit_map: dict[str, Any],
    feeds: dict[str, torch.Tensor],
    rounds: int,
    result: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Steps 1-3 (fills `result`); returns the UNet output with set A fused and A's arrays. Its sessions are
    released on return, before the alternative builds its own."""
    from ember.pipeline.loras import LoraState
    from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from ember.runtime.refit_map import OnnxWeights
    from ember.specs.sd15 import UNET

    # 1. Session creation: plain (constant weights) and refittable (refit map's weights overridable)
    start = time.perf_counter()
    plain = OnnxRuntimeRunner(UNET, onnx_path)
    result["create_plain_s"] = time.perf_counter() - start
    start = time.perf_counter()
    refit = OnnxRuntimeRunner(UNET, onnx_path, refittable=True)
    result["create_refittable_s"] = time.perf_counter() - start
    result["overridable_weights"] = len(refit_map)
    table = OnnxWeights(onnx_path, refit_map)
    lora_a, lora_b = _random_lora(table, 1), _random_lora(table, 2)
    result["lora_weights"] = len(lora_a.factors["unet"])

    # 2. Switching sets through LoraState (merge from pristine copies in float32, then refit)
    state = LoraState({"unet": refit}, {"unet": refit.weights()})
    switches = {}
    for label, loras in (
        ("base->A (first: reads pristine copies, merges)", ((lora_a, 1.0),)),
        ("A->B (merges)", ((lora_b, 1.0),)),
        ("B->A (cached merged set)", ((lora_a, 1.0),)),
        ("A->base (restore)", ()),
        ("base->A (cached)", ((lora_a, 1.0),)),
    ):
        switches[label] = _timed(lambda loras=loras: state.apply(loras))
    result["switch_s"] = switches
    # The parts of a new set's switch: LoraState's float32 merge (torch) and the runner's refit (conversion
    # to the initializers' layout + the sampled compare against the file; feeding costs nothing until a run).
    lora_c = _random_lora(table, 3)
    start = time.perf_counter()
    merged = state._merge(((lora_c, 1.0),))["unet"]
    result["merge_only_s"] = time.perf_counter() - start
    result["refit_only_s"] = _timed(lambda: refit.refit(merged))
    state._current = ()  # the runner holds C now: make LoraState push its next set in full
    state._touched["unet"] = set(merged)

    # 3. Per-run cost, interleaved: plain session, refittable with the base (nothing fed), with A fed
    plain.run(feeds)
    state.apply(())
    refit.run(feeds)
    times: dict[str, list[float]] = {"plain": [], "refittable_base": [], "refittable_lora": []}
    for _ in range(rounds):
        times["plain"].append(_timed(lambda: plain.run(feeds)))
        state.apply(())
        times["refittable_base"].append(_timed(lambda: refit.run(feeds)))
        state.apply(((lora_a, 1.0),))
        times["refittable_lora"].append(_timed(lambda: refit.run(feeds)))
    result["run_s"] = {k: {"median": statistics.median(v), "all": v} for k, v in times.items()}
    fused = refit.run(feeds)["noise_pred"]
    return fused, dict(refit._overrides)  # the A set as ORT takes it (initializer name -> array)


def measure(cache: Path, height: int = 256, width: int = 256, rounds: int = 5) -> dict[str, Any]:
    import onnxruntime as ort

    from ember.runtime.refit_map import read_refit_map, write_refit_map
    from ember.specs.sd15 import UNET

    source, onnx_path = prepare(cache)
    if read_refit_map(onnx_path) is None:  # exports made before refit maps: add the map (needs the module)
        print("[bench] writing the refit map (loads the torch UNet once)", flush=True)
        write_refit_map(onnx_path, UNET.load(str(source), None, torch.float32))
    refit_map = read_refit_map(onnx_path)
    assert refit_map is not None
    config = json.loads((source / "unet" / "config.json").read_text())
    feeds = UNET.sample_inputs(config, 1, height, width, seed=0)
    result: dict[str, Any] = {
        "network": "SD1.5 LCM UNet (random weights, real config)",
        "shape": [1, height, width],
    }

    fused, overrides = _overridable(onnx_path, refit_map, feeds, rounds, result)
    gc.collect()

    # 4. The alternative: a new session per set, the set's weights given with add_initializer
    values = [
        (name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))) for name, a in overrides.items()
    ]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, value in values:
        options.add_initializer(name, value)
    start = time.perf_counter()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    result["switch_by_new_session_s"] = time.perf_counter() - start
    inputs = {t.name: feeds[t.name].numpy() for t in UNET.inputs}
    session.run(None, inputs)
    rebuilt = [_timed(lambda: session.run(None, inputs)) for _ in range(rounds)]
    result["run_s"]["new_session_lora"] = {"median": statistics.median(rebuilt), "all": rebuilt}
    out = torch.from_numpy(session.run(None, inputs)[0])
    result["max_abs_diff_overridable_vs_new_session"] = float((out - fused).abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("var/bench"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.cache, rounds=args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_refit.json").write_text(json.dumps(result, indent=1))
    run = {k: v["median"] for k, v in result["run_s"].items()}
    print(json.dumps({k: v for k, v in result.items() if k != "run_s"}, indent=1))
    print(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
