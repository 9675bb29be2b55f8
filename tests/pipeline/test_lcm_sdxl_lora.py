"""fal-ai/lcm model="sdxl" + lora_url: our LCM SDXL pipeline with an SDXL LoRA fused (UNet + both text
encoders) vs diffusers' StableDiffusionXLPipeline (LCM UNet, LCMScheduler) + load_lora_weights +
fuse_lora(lora_scale), on the tiny SDXL stand-in; exact switching between sets on ONNX Runtime; SDXL file
names (diffusers' and kohya's lora_te2_) parsed into the three components."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline import Text2ImageRequest
from ember.pipeline.lcm_xl import LcmXLPipeline
from ember.pipeline.loras import LoraFile, parse_lora
from ember.settings import Settings
from ember.specs import Artifacts, ensure_artifacts, read_artifacts
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.tiny_lora import make_xl_lora

SCALE = 0.7
BASE = Text2ImageRequest(
    prompt="an astronaut riding a horse", seed=7, width=128, height=96, guidance_scale=6.0, model="sdxl"
)


@pytest.fixture(scope="module")
def xl_artifacts(lcm_settings: Settings) -> Artifacts:
    return read_artifacts(ensure_artifacts(lcm_settings, "lcm", "sdxl", progress=False))


@pytest.fixture(scope="module")
def ort_xl(lcm_settings: Settings, xl_artifacts: Artifacts) -> LcmXLPipeline:
    return LcmXLPipeline.from_artifacts(lcm_settings, xl_artifacts)


@pytest.fixture(scope="module")
def torch_xl(var_dir: Path, xl_artifacts: Artifacts) -> LcmXLPipeline:
    settings = tiny_settings(var_dir, EMBER_RUNTIME="torch", EMBER_DEVICE="cpu", EMBER_DTYPE="float32")
    return LcmXLPipeline.from_artifacts(settings, xl_artifacts)


@pytest.fixture(scope="module")
def xl_loras(xl_artifacts: Artifacts, tmp_path_factory) -> dict[str, tuple[Path, LoraFile]]:
    from safetensors.torch import load

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        path = make_xl_lora(xl_artifacts.source, tmp_path_factory.mktemp(f"lcm-xl-lora-{name}"), seed)
        data = path.read_bytes()
        out[name] = (path, parse_lora(load(data), hashlib.sha256(data).hexdigest()))
    return out


@pytest.fixture(scope="module")
def diffusers_xl(xl_artifacts: Artifacts):
    """The base pipeline with lcm-sdxl's scheduler swap (`LCMScheduler.from_config(pipe.scheduler.config)`)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        xl_artifacts.source, add_watermarker=False, dtype=torch.float32
    )
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(pipeline: LcmXLPipeline, request: Text2ImageRequest) -> np.ndarray:
    [result] = pipeline([request])
    return result.images.numpy().astype(np.int16)


def test_xl_lora_parses_into_both_encoders_and_the_unet(xl_loras) -> None:
    lora = xl_loras["a"][1]
    assert set(lora.factors) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in lora.factors["text_encoder_2"])


def test_kohya_names_become_the_networks_own() -> None:
    """kohya / A1111 files (lora_te1_ / lora_te2_ / lora_unet_, .alpha): diffusers' conversion leaves the
    attention weights in old processor names (to_q_lora.down), which parse_lora must map to the modules
    (q_proj, to_q) rather than skip."""
    q = "text_model_encoder_layers_0_self_attn_q_proj"
    attn = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = parse_lora(
        {
            f"lora_te2_{q}.lora_down.weight": torch.ones(2, 8),
            f"lora_te2_{q}.lora_up.weight": torch.ones(8, 2),
            f"lora_te2_{q}.alpha": torch.tensor(1.0),
            f"lora_te1_{q}.lora_down.weight": torch.ones(2, 8),
            f"lora_te1_{q}.lora_up.weight": torch.ones(8, 2),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 8),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 2),
            f"lora_unet_{attn}.lora_down.weight": torch.ones(4, 8),
            f"lora_unet_{attn}.lora_up.weight": torch.ones(8, 4),
            f"lora_unet_{attn}.alpha": torch.tensor(2.0),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2),
        },
        "kohya",
    )
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert lora.factors["text_encoder_2"].keys() == {name}
    assert lora.factors["text_encoder"].keys() == {name, "text_model.encoder.layers.0.mlp.fc1.weight"}
    assert lora.factors["unet"].keys() == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
    }
    assert lora.factors["text_encoder_2"][name][2] == 0.5  # alpha 1 / rank 2
    assert lora.factors["text_encoder"][name][2] == 1.0  # no alpha: alpha = rank
    assert lora.factors["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"][2] == 0.5


def test_xl_lora_matches_diffusers_fuse_lora(torch_xl, ort_xl, diffusers_xl, xl_loras) -> None:
    """torch: the same float32 merge as diffusers' fuse_lora on the UNet and both encoders, bit-identical
    images; ONNX Runtime: the export tolerance on top (test_lcm_sdxl's, at most 2 levels). The first
    encoder's last layer is read by nothing (penultimate states): its deltas are skipped here, fused (with
    no effect) by diffusers."""
    path, lora = xl_loras["a"]
    request = dataclasses.replace(BASE, loras=((lora, SCALE),))
    diffusers_xl.load_lora_weights(str(path.parent), adapter_name="a")
    diffusers_xl.fuse_lora(lora_scale=SCALE)
    try:
        theirs = np.stack(
            [
                np.asarray(image)
                for image in diffusers_xl(
                    BASE.prompt,
                    width=BASE.width,
                    height=BASE.height,
                    num_inference_steps=BASE.num_inference_steps,
                    guidance_scale=BASE.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(BASE.seed),
                ).images
            ]
        ).astype(np.int16)
    finally:
        diffusers_xl.unfuse_lora()
        diffusers_xl.unload_lora_weights()
    torch_diff = np.abs(_ours(torch_xl, request) - theirs)
    ort_diff = np.abs(_ours(ort_xl, request) - theirs)
    base = _ours(torch_xl, BASE)
    print(
        f"lcm sdxl LoRA parity: torch max {torch_diff.max()}, onnxruntime max {ort_diff.max()} levels "
        f"({(ort_diff > 0).mean():.4%} of values differ); the LoRA moves the image {np.abs(base - theirs).mean():.1f}"
    )
    # measured: the LoRA moves the tiny model's image by 4.6 levels on average; torch 0, ORT max 1
    assert np.abs(base - theirs).mean() > 3, "the LoRA hardly changed the image: the test proves nothing"
    assert torch_diff.max() == 0
    assert ort_diff.max() <= 2 and (ort_diff > 0).mean() < 0.01


def test_text_encoder_2_alone_is_fused(torch_xl, xl_loras) -> None:
    """A LoRA on the second encoder only changes the image: its weights are not dropped on the way."""
    lora = xl_loras["a"][1]
    te2_only = dataclasses.replace(
        lora, digest="te2-only", factors={"text_encoder_2": lora.factors["text_encoder_2"]}
    )
    changed = _ours(torch_xl, dataclasses.replace(BASE, loras=((te2_only, 1.0),)))
    assert np.abs(changed - _ours(torch_xl, BASE)).max() > 0


def test_switching_sets_is_exact_on_onnxruntime(ort_xl, xl_loras) -> None:
    """base -> A -> B -> A -> base: the pristine weights of all three runners come back bit for bit."""
    a = dataclasses.replace(BASE, loras=((xl_loras["a"][1], SCALE),))
    b = dataclasses.replace(BASE, loras=((xl_loras["b"][1], 1.0),))
    base = _ours(ort_xl, BASE)
    first_a = _ours(ort_xl, a)
    first_b = _ours(ort_xl, b)
    assert np.abs(first_a - base).max() > 0 and np.abs(first_b - first_a).max() > 0
    assert np.array_equal(_ours(ort_xl, a), first_a)
    assert np.array_equal(_ours(ort_xl, BASE), base)


def test_sd15_loras_are_refused_by_name(ort_xl) -> None:
    """A LoRA for another model (an SD1.5 UNet weight name / width) is refused before anything is fused."""
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wide = parse_lora(
        {f"unet.{q}.lora_A.weight": torch.ones(2, 999), f"unet.{q}.lora_B.weight": torch.ones(4, 2)}, "wide"
    )
    problems = ort_xl.problems(dataclasses.replace(BASE, loras=((wide, 1.0),)))
    assert any(p.startswith("lora_url:") for p in problems), problems
