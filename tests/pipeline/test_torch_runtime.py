"""The torch runtime's CPU-testable parts, and the refit name map that TensorRT LoRA refit relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember.runtime.refit_map import refit_name_map
from ember.runtime.tensorrt_runner import map_refit_weights
from ember.runtime.torch_runner import TorchRunner, optimize_module
from ember.specs.sd15 import TEXT_ENCODER, UNET


@pytest.fixture(scope="module")
def unet_feeds(lcm_artifacts) -> dict[str, torch.Tensor]:
    return UNET.sample_inputs(lcm_artifacts.config("unet"), batch=2, height=64, width=96)


def test_fp32_cpu_runner_is_the_eager_module(lcm_artifacts, unet_feeds) -> None:
    runner = TorchRunner(UNET, lcm_artifacts.source, None, "cpu", torch.float32, warmup=[(1, 64, 64)])
    module = UNET.load(lcm_artifacts.source, None, torch.float32)
    with torch.inference_mode():
        want = module(*(unet_feeds[n] for n in UNET.input_names))
    got = runner.run(unet_feeds)["noise_pred"]
    assert runner.compile_mode == "none"  # compilation is CUDA-only
    assert torch.equal(got, want)


def test_bf16_runner_stays_close_to_fp32(lcm_artifacts, unet_feeds) -> None:
    fp32 = TorchRunner(UNET, lcm_artifacts.source, None, "cpu", torch.float32).run(unet_feeds)["noise_pred"]
    bf16 = TorchRunner(UNET, lcm_artifacts.source, None, "cpu", torch.bfloat16).run(unet_feeds)["noise_pred"]
    assert bf16.dtype == torch.float32  # the Runner contract: float outputs come back as float32
    # bf16 keeps 8 mantissa bits (~4e-3 relative per op, compounding over the UNet's layers): measured
    # max |bf16 - fp32| = 0.16 std, mean far below; a wrong cast or dtype mix gives errors of order 1 std.
    diff = (bf16 - fp32).abs()
    assert diff.max() < 0.3 * fp32.std() and diff.mean() < 0.05 * fp32.std()


def test_unknown_compile_mode_is_refused(lcm_artifacts) -> None:
    with pytest.raises(ValueError, match="compile mode"):
        TorchRunner(UNET, lcm_artifacts.source, None, "cpu", torch.float32, compile_mode="fast")


def test_optimize_module_casts_and_keeps_nchw_on_cpu() -> None:
    conv = optimize_module(nn.Sequential(nn.Conv2d(4, 8, 3)), torch.device("cpu"), torch.bfloat16)
    weight = conv[0].weight
    assert weight.dtype == torch.bfloat16 and weight.is_contiguous()  # channels_last only on CUDA


def test_refit_map_finds_every_attention_and_linear_weight(lcm_artifacts) -> None:
    """LoRA targets to_q/to_k/to_v/to_out and the feed-forward Linears: each must map to exactly the
    ONNX initializer holding it (transposed where the exporter folded MatMul weights)."""
    import onnx
    from onnx import numpy_helper

    module = UNET.load(lcm_artifacts.source, None, torch.float32)
    mapping, _ = refit_name_map(lcm_artifacts.onnx_path("unet"), module)
    state = module.unet.state_dict()
    targets = [
        k
        for k in state
        if k.endswith(".weight") and any(part in k for part in ("to_q", "to_k", "to_v", "to_out.0", "ff.net"))
    ]
    assert targets and all(k in mapping for k in targets)
    initializers = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(lcm_artifacts.onnx_path("unet"))).graph.initializer
    }
    mapped = map_refit_weights(mapping, {k: state[k] for k in targets}, "unet")
    for name, value in mapped.items():
        assert torch.equal(value, torch.from_numpy(initializers[name].copy()))
    with pytest.raises(KeyError, match="no refittable weights"):
        map_refit_weights(mapping, {"nope.weight": torch.ones(1)}, "unet")


def test_refit_map_of_the_text_encoder(lcm_artifacts) -> None:
    module = TEXT_ENCODER.load(lcm_artifacts.source, None, torch.float32)
    mapping, unmatched = refit_name_map(lcm_artifacts.onnx_path("text_encoder"), module)
    assert all(k in mapping for k in module.text_encoder.state_dict() if k.endswith("q_proj.weight"))
    assert set(mapping).isdisjoint(unmatched)
