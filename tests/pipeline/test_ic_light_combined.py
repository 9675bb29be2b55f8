"""IC-Light combined with fal-ai/lora's `loras`, `controlnets` and `ip_adapter`, each vs IC-Light's own
procedure (test_ic_light_parity.patch_reference: conv_in widened, offsets added, the hooked UNet forward) on
the diffusers pipeline that serves the other input: StableDiffusionPipeline + load_lora_weights / fuse_lora
on the patched UNet (LoRA deltas on top of base + offsets), StableDiffusionControlNetPipeline (the
ControlNet sees the 4-channel latents, the hooked UNet the concat), StableDiffusionPipeline +
load_ip_adapter after the patch. Tiny random SD1.5 base (SD1.5's block layout, so ControlNets fit), tiny
ControlNet, IP-Adapter, LoRAs and IC-Light offsets."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline.ic_light import IcLightInput
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef
from ember.pipeline.loras import parse_lora
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_ic_light_parity import _image, _offsets, patch_reference
from tests.pipeline.test_lora_parity import _make_lora

SIZE, STEPS = 64, 3
PROMPT = {"prompt": "a portrait, warm sunlight", "negative_prompt": "lowres", "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ember.specs.demo_controlnet import build_tiny_controlnet, build_tiny_sd15_base
    from ember.specs.demo_ip_adapter import build_tiny_ip_adapter

    root = tmp_path_factory.mktemp("ic-light-combined")
    base = build_tiny_sd15_base(root / "base")
    return {
        "base": base,
        "cn": build_tiny_controlnet(root / "cn", seed=1),
        "ip": build_tiny_ip_adapter(root / "ip", base),
        "root": root,
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch"))


@pytest.fixture(scope="module")
def fc(dirs) -> bytes:
    return _offsets(dirs["base"], 8, seed=5)


@pytest.fixture(scope="module")
def loras(dirs) -> dict:
    """Two random LoRAs (UNet attention + text encoder), saved as diffusers saves them, parsed."""
    from safetensors.torch import load as load_safetensors

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        data = _make_lora(dirs["base"], dirs["root"] / f"lora-{name}", seed)
        out[name] = parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest())
    return out


FG = _image(1, (80, 60))


def _request(dirs, fc: bytes | None, seed: int = 4, **kw) -> LoraRequest:
    return LoraRequest(
        model=ModelRef(str(dirs["base"])),
        seed=seed,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        ic_light=None if fc is None else IcLightInput.of(fc, FG),
        **{**PROMPT, **kw},
    )


def _ours(pipeline, *requests: LoraRequest) -> list[np.ndarray]:
    results = pipeline(list(requests))
    for r in results:
        assert r.error is None, r.error
    return [r.images.numpy().astype(np.int16) for r in results]


def _run(pipe, conds: torch.Tensor, seed: int = 4, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        **PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        cross_attention_kwargs={"concat_conds": conds},
        **kw,
    ).images
    return (image * 255).round().astype(np.int16)


def _diff(ours: np.ndarray, theirs: np.ndarray, what: str) -> int:
    assert ours.shape == theirs.shape
    diff = int(np.abs(ours - theirs).max())
    print(f"{what}: max pixel difference {diff} (uint8 levels)")
    return diff


def _sd_pipeline(base: Path, **kw):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        base, safety_checker=None, requires_safety_checker=False, dtype=torch.float32, **kw
    )


def test_loras_reach_the_patched_unet_and_sets_restore_exactly(pipeline, dirs, loras) -> None:
    fc = _offsets(dirs["base"], 8, seed=6)  # its patched UNet is built in this test, under a fused LoRA set
    a, b = ((loras["a"], 0.7),), ((loras["b"], 1.5),)
    # First the IC-Light file with A: A is fused into the base UNet when the patched one is built from the
    # base's pristine weights (else A would count twice)
    (lit_a,) = _ours(pipeline, _request(dirs, fc, loras=a))
    patched = pipeline.ic_light.unet(pipeline.model(ModelRef(str(dirs["base"]))), IcLightInput.of(fc, FG))
    weights_a = {k: v.clone() for k, v in patched.weights().items()}
    plain, lit = _ours(pipeline, _request(dirs, None), _request(dirs, fc))  # no LoRA
    weights_none = {k: v.clone() for k, v in patched.weights().items()}

    pipe = _sd_pipeline(dirs["base"])
    conds = patch_reference(pipe, fc, FG, None, SIZE, SIZE)
    # LoRA after the patch: its deltas on base + offsets (IC-Light's UNet is what the LoRA is loaded into)
    pipe.load_lora_weights(str(dirs["root"] / "lora-a"), adapter_name="a")
    pipe.fuse_lora(lora_scale=0.7)
    assert _diff(lit_a, _run(pipe, conds), "IC-Light + LoRA vs the IC-Light procedure") <= 1
    assert np.abs(lit_a - lit).max() > 0, "the LoRA changed nothing"

    # A -> B (plain and IC-Light) -> A: both UNets back bit for bit, and so is no LoRA on either
    _ours(pipeline, _request(dirs, None, loras=b), _request(dirs, fc, loras=b))
    assert np.array_equal(_ours(pipeline, _request(dirs, fc, loras=a))[0], lit_a)
    assert all(torch.equal(weights_a[k], v) for k, v in patched.weights().items())
    again_plain, again_lit = _ours(pipeline, _request(dirs, None), _request(dirs, fc))
    assert np.array_equal(again_plain, plain) and np.array_equal(again_lit, lit)
    assert all(torch.equal(weights_none[k], v) for k, v in patched.weights().items())


CONTROL = np.random.default_rng(8).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _controlnet_pipeline(dirs, fc: bytes):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        dirs["base"],
        controlnet=ControlNetModel.from_pretrained(dirs["cn"], dtype=torch.float32),
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    return pipe, patch_reference(pipe, fc, FG, None, SIZE, SIZE)


def test_controlnets_with_ic_light_match_the_controlnet_pipeline(pipeline, dirs, fc) -> None:
    unit = ControlNetInput(ControlNetRef(str(dirs["cn"])), CONTROL, conditioning_scale=0.8)
    lit, controlled = _ours(pipeline, _request(dirs, fc), _request(dirs, fc, controlnets=(unit,)))

    pipe, conds = _controlnet_pipeline(dirs, fc)
    theirs = _run(pipe, conds, image=Image.fromarray(CONTROL), controlnet_conditioning_scale=0.8)
    assert _diff(controlled, theirs, "IC-Light + ControlNet vs the IC-Light procedure") <= 1
    assert np.abs(controlled - lit).max() > 0, "the ControlNet changed nothing"
    # Its batch-mate without a ControlNet got zero residuals: the IC-Light-only result (run alone here:
    # another batch size, so within a level, as in test_lora_controlnets)
    (alone,) = _ours(pipeline, _request(dirs, fc))
    assert _diff(alone, lit, "IC-Light, zero ControlNet residuals: batched vs alone") <= 1


def test_ip_adapter_with_ic_light_matches_diffusers(pipeline, dirs, fc) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterUnit, parse_ip_adapter
    from ember.specs.demo_ip_adapter import SUBFOLDER, WEIGHT_NAME

    file = dirs["ip"] / SUBFOLDER / WEIGHT_NAME
    weights = parse_ip_adapter(load_file(file), hashlib.sha256(file.read_bytes()).hexdigest())
    picture = _image(9, (SIZE, SIZE))
    ip = IPAdapterRequest(
        (IPAdapterUnit(weights, (picture,), None, 0.7),), str(dirs["ip"] / SUBFOLDER / "image_encoder")
    )
    (lit,) = _ours(pipeline, _request(dirs, fc))
    (ours,) = _ours(pipeline, _request(dirs, fc, ip_adapter=ip))

    encoder = CLIPVisionModelWithProjection.from_pretrained(dirs["ip"] / SUBFOLDER / "image_encoder")
    size = encoder.config.image_size
    pipe = _sd_pipeline(
        dirs["base"], image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size)
    )
    conds = patch_reference(pipe, fc, FG, None, SIZE, SIZE)  # the patch first: IP layers load onto it
    pipe.load_ip_adapter(
        str(dirs["ip"]), subfolder=SUBFOLDER, weight_name=WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(0.7)
    assert (
        _diff(
            ours,
            _run(pipe, conds, ip_adapter_image=Image.fromarray(picture)),
            "IC-Light + IP-Adapter vs the IC-Light procedure",
        )
        <= 1
    )
    assert np.abs(ours - lit).max() > 0, "the IP-Adapter changed nothing"
    # the patched UNet itself is untouched by the IP layers (they live on a copy sharing its weights)
    (again,) = _ours(pipeline, _request(dirs, fc))
    assert np.array_equal(again, lit)


def test_lora_and_controlnet_with_ic_light(pipeline, dirs, fc, loras) -> None:
    """All three in one request: the ControlNet pipeline, patched, with the LoRA fused on top."""
    unit = ControlNetInput(ControlNetRef(str(dirs["cn"])), CONTROL)
    (ours,) = _ours(pipeline, _request(dirs, fc, loras=((loras["b"], 1.5),), controlnets=(unit,)))

    pipe, conds = _controlnet_pipeline(dirs, fc)
    pipe.load_lora_weights(str(dirs["root"] / "lora-b"), adapter_name="b")
    pipe.fuse_lora(lora_scale=1.5)
    assert (
        _diff(
            ours,
            _run(pipe, conds, image=Image.fromarray(CONTROL)),
            "IC-Light + LoRA + ControlNet vs the IC-Light procedure",
        )
        <= 1
    )


def test_patched_unets_belong_to_their_base_model(pipeline, dirs, fc) -> None:
    """The same directory with a unet_name is another base model: its own patched UNet (built from its
    UNet), never the first one's."""
    unet_dir = ModelRef(str(dirs["base"]), unet=str(dirs["base"] / "unet"))
    (lit,) = _ours(pipeline, _request(dirs, fc))
    (other,) = _ours(pipeline, dataclasses.replace(_request(dirs, fc), model=unet_dir))
    assert np.array_equal(lit, other)  # the same weights: the same image
    first, second = (pipeline.model(ref) for ref in (ModelRef(str(dirs["base"])), unet_dir))
    ic_light = IcLightInput.of(fc, FG)
    assert pipeline.ic_light.unet(first, ic_light) is not pipeline.ic_light.unet(second, ic_light)
