"""TensorRT builder, runner and refit on the tiny LCM exports. Needs TensorRT and a CUDA GPU: skipped here."""

from __future__ import annotations

import pytest
import torch

from ember.runtime.tensorrt_runner import tensorrt_available

pytestmark = pytest.mark.skipif(
    not (tensorrt_available() and torch.cuda.is_available()),
    reason="TensorRT not installed" if not tensorrt_available() else "TensorRT needs a CUDA GPU",
)


@pytest.fixture(scope="module")
def engines(lcm_settings, lcm_artifacts, tmp_path_factory):
    from ember.runtime.engine_cache import EngineOptions
    from ember.runtime.tensorrt_build import build_engines
    from ember.specs.artifacts import family_spec
    from ember.specs.base import ShapeBucket

    networks = list(family_spec("lcm", "sdv1-5").load_networks())
    buckets = (
        ShapeBucket("tiny", 64, 96, batch_max=4),
        ShapeBucket("dynamic", 64, 64, batch_max=4, min_side=64, max_side=256),
    )
    options = EngineOptions(precision="fp16", refit="lora", buckets=buckets, optimization_level=0)
    export_dir = tmp_path_factory.mktemp("trt")
    return networks, build_engines(lcm_artifacts, networks, options, export_dir, progress=False)


def test_engines_are_verified_and_cached(engines, lcm_artifacts) -> None:
    networks, engine_set = engines
    for spec in networks:
        entry = engine_set.manifest["networks"][spec.name]
        assert entry["verify_rel_error"] <= entry["verify_tolerance"]


def test_runner_matches_onnxruntime_and_replays_graphs(engines, lcm_settings, lcm_artifacts) -> None:
    from ember.runtime import create_runner
    from ember.runtime.tensorrt_runner import TensorRTRunner
    from ember.specs.sd15 import UNET

    _, engine_set = engines
    runner = TensorRTRunner(UNET, engine_set)
    feeds = UNET.sample_inputs(lcm_artifacts.config("unet"), batch=2, height=64, width=96)
    reference = create_runner(lcm_settings, lcm_artifacts, UNET).run(feeds)["noise_pred"]
    outs = [runner.run(feeds)["noise_pred"].cpu() for _ in range(3)]  # 3rd call replays the CUDA graph
    for out in outs:
        assert (out - reference).abs().max() <= 5e-2 * reference.std()
    assert torch.equal(outs[1], outs[2])
    dynamic = UNET.sample_inputs(lcm_artifacts.config("unet"), batch=1, height=128, width=200)
    assert runner.run(dynamic)["noise_pred"].shape == (1, 4, 16, 25)


def test_refit_changes_the_output(engines, lcm_artifacts) -> None:
    from ember.runtime.tensorrt_runner import TensorRTRunner
    from ember.specs.sd15 import UNET

    _, engine_set = engines
    runner = TensorRTRunner(UNET, engine_set)
    feeds = UNET.sample_inputs(lcm_artifacts.config("unet"), batch=1, height=64, width=96)
    before = runner.run(feeds)["noise_pred"]
    key = next(k for k in runner._refit_map if k.endswith("attn1.to_q.weight"))
    shape = UNET.load(lcm_artifacts.source, None, torch.float32).unet.state_dict()[key].shape
    runner.refit({key: torch.randn(shape)})
    assert not torch.allclose(before, runner.run(feeds)["noise_pred"])
