"""Weight refit on ONNX Runtime: the refit map written at export, overridable initializers, and LoRA sets
through ember.pipeline.loras.LoraState on ORT runners (A -> B -> A and base -> A -> base bit-identical)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ember.pipeline.loras import LoraFile, LoraState, parse_lora
from ember.runtime import RefitNotSupportedError, create_runner
from ember.runtime.refit_map import read_refit_map
from ember.runtime.torch_runner import TorchRunner
from ember.specs.sd15 import TEXT_ENCODER, UNET
from tests.pipeline.tiny_lora import make_lora

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # a folded, transposed MatMul weight


@pytest.fixture(scope="module")
def loras(lcm_artifacts, tmp_path_factory) -> dict[str, LoraFile]:
    from safetensors.torch import load

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        data = make_lora(lcm_artifacts.source, tmp_path_factory.mktemp(f"lora-{name}"), seed).read_bytes()
        out[name] = parse_lora(load(data), hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture(scope="module")
def feeds(lcm_artifacts) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "unet": UNET.sample_inputs(lcm_artifacts.config("unet"), batch=2, height=64, width=96),
        "text_encoder": TEXT_ENCODER.sample_inputs(lcm_artifacts.config("text_encoder"), 2, 64, 64),
    }


def test_export_writes_the_refit_map(lcm_artifacts) -> None:
    for name in ("text_encoder", "unet"):
        entry = lcm_artifacts.manifest["networks"][name]
        mapping = read_refit_map(lcm_artifacts.onnx_path(name))
        assert mapping and entry["refit_map"] == f"{name}.refit.json"
    unet_map = read_refit_map(lcm_artifacts.onnx_path("unet"))
    assert unet_map[Q]["transpose"] and unet_map[Q]["onnx"].startswith("onnx::MatMul")
    assert unet_map["conv_in.weight"] == {"onnx": "unet.conv_in.weight", "transpose": False}


def test_weights_are_the_state_dict_exactly(lcm_settings, lcm_artifacts) -> None:
    runner = create_runner(lcm_settings, lcm_artifacts, UNET, refittable=True)
    state = UNET.load(lcm_artifacts.source, None, torch.float32).unet.state_dict()
    weights = runner.weights()
    # Every Linear / Conv weight (what LoRAs change) is refittable by name. Left out: 1-D parameters whose
    # exported copy is reshaped (GroupNorm) or has identical twins (freshly initialized norms: all ones).
    assert all(key in weights for key, value in state.items() if value.dim() >= 2)
    for key in weights:
        assert torch.equal(weights[key], state[key]), key  # transposes undone, bit for bit


def test_refit_agrees_with_torch_and_restores_bit_for_bit(
    var_dir, lcm_settings, lcm_artifacts, feeds
) -> None:
    from tests.pipeline.conftest import tiny_settings

    ort_unet = create_runner(lcm_settings, lcm_artifacts, UNET, refittable=True)
    torch_unet = create_runner(tiny_settings(var_dir, EMBER_RUNTIME="torch"), lcm_artifacts, UNET)
    assert isinstance(torch_unet, TorchRunner)
    base = ort_unet.run(feeds["unet"])["noise_pred"]
    original = ort_unet.weights()[Q].clone()
    new = {
        Q: torch.randn(original.shape, generator=torch.Generator().manual_seed(0)),
        "conv_out.bias": torch.ones(4),
    }
    # (a transposed MatMul weight and a bias used as it is, by their diffusers state-dict names)
    ort_unet.refit(new)
    torch_unet.refit(new)
    changed = ort_unet.run(feeds["unet"])["noise_pred"]
    assert (changed - base).abs().max() > 1e-2
    assert (changed - torch_unet.run(feeds["unet"])["noise_pred"]).abs().max() < 1e-3  # the export tolerance
    assert torch.equal(ort_unet.weights()[Q], new[Q])
    bias = UNET.load(lcm_artifacts.source, None, torch.float32).unet.state_dict()["conv_out.bias"]
    ort_unet.refit({Q: original, "conv_out.bias": bias})  # the base again: its outputs, bit for bit
    assert torch.equal(ort_unet.run(feeds["unet"])["noise_pred"], base)
    with pytest.raises(KeyError, match="no weights named"):
        ort_unet.refit({"not.a.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        ort_unet.refit({Q: original.t()[:3]})
    plain = create_runner(lcm_settings, lcm_artifacts, UNET)  # not refittable: ORT keeps constant weights
    with pytest.raises(RefitNotSupportedError, match="refittable=True"):
        plain.refit({})


def _outputs(runners, feeds) -> dict[str, torch.Tensor]:
    return {
        "unet": runners["unet"].run(feeds["unet"])["noise_pred"],
        "text_encoder": runners["text_encoder"].run(feeds["text_encoder"])["text_embeddings"],
    }


def test_lora_state_on_onnxruntime_switches_sets_exactly(
    var_dir, lcm_settings, lcm_artifacts, loras, feeds
) -> None:
    """fal-ai/lora's and fal-ai/lcm's LoRA state, unchanged, on ORT runners: A -> B -> A gives A's outputs
    bit for bit, base -> A -> base the base's, and the fused weights equal the torch runtime's exactly."""
    from tests.pipeline.conftest import tiny_settings

    specs = {"unet": UNET, "text_encoder": TEXT_ENCODER}
    ort = {n: create_runner(lcm_settings, lcm_artifacts, s, refittable=True) for n, s in specs.items()}
    state = LoraState(ort, {n: r.weights() for n, r in ort.items()})
    torch_settings = tiny_settings(var_dir, EMBER_RUNTIME="torch")
    ref = {n: create_runner(torch_settings, lcm_artifacts, s) for n, s in specs.items()}
    ref_state = LoraState(ref, {n: r.weights() for n, r in ref.items()})

    a, b = ((loras["a"], 0.7),), ((loras["a"], 0.7), (loras["b"], 1.5))
    base = _outputs(ort, feeds)
    state.apply(a)
    ref_state.apply(a)
    fused_a = _outputs(ort, feeds)
    for component in ("unet", "text_encoder"):
        assert (fused_a[component] - base[component]).abs().max() > 1e-3, f"the LoRA changed no {component}"
        ort_w, ref_w = ort[component].weights(), ref[component].weights()
        for name in loras["a"].factors[component]:
            assert torch.equal(ort_w[name], ref_w[name]), name
    state.apply(b)
    assert not torch.equal(_outputs(ort, feeds)["unet"], fused_a["unet"])
    state.apply(a)  # from the cache of merged sets
    again = _outputs(ort, feeds)
    state.apply(())
    restored = _outputs(ort, feeds)
    for component in ("unet", "text_encoder"):
        assert torch.equal(again[component], fused_a[component])
        assert torch.equal(restored[component], base[component])
