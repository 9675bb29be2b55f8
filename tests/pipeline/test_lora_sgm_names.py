"""Kohya SDXL LoRAs in the original (SGM) UNet block names — lora_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q — as kohya's sd-scripts write them for SDXL: mapped to diffusers' names for the base model's own
UNet layout (layers_per_block, read from its weights), so they fuse exactly like the same LoRA saved in
diffusers names, and the image matches diffusers' load_lora_weights (which maps them with the pipeline's
UNet config) + fuse_lora on the tiny SDXL base (layers_per_block 1, where the SDXL default of 2 would name
other blocks)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.loras import is_sgm_lora, parse_lora
from ember.specs.demo_sdxl import build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.tiny_lora import make_xl_lora

SIZE, STEPS = 64, 3


def to_kohya_sgm(diffusers_file: Path, out: Path, layers_per_block: int, unet_only: bool = False) -> Path:
    """The diffusers-named SDXL LoRA at `diffusers_file` rewritten as kohya writes SDXL LoRAs: UNet blocks in
    SGM numbering (input_blocks.<1 + b * (L + 1) + l>.1 for down_blocks.b.attentions.l, middle_block.1,
    output_blocks.<b * (L + 1) + l>.1), lora_te1_ / lora_te2_ encoders, dots as underscores, lora_down /
    lora_up and an alpha per module (= rank, so the scale is the same as the diffusers file's).
    `unet_only`: without the encoders (diffusers' loader cannot infer the naming of kohya encoder LoRAs that
    adapt q/v but not out_proj, which ember.pipeline.loras reads; the reference then gets the UNet alone)."""
    step = layers_per_block + 1
    blocks = (
        (
            re.compile(r"unet\.down_blocks\.(\d+)\.attentions\.(\d+)\."),
            lambda b, n: f"input_blocks.{1 + b * step + n}.1.",
        ),
        (
            re.compile(r"unet\.up_blocks\.(\d+)\.attentions\.(\d+)\."),
            lambda b, n: f"output_blocks.{b * step + n}.1.",
        ),
        (re.compile(r"unet\.mid_block\.attentions\.0\."), lambda *_: "middle_block.1."),
    )
    kohya: dict[str, torch.Tensor] = {}
    for key, value in load_safetensors(diffusers_file.read_bytes()).items():
        module, _, kind = key.rpartition(".lora_")  # kind: "A.weight" / "B.weight"
        if unet_only and not module.startswith("unet."):
            continue
        for pattern, sgm in blocks:
            m = pattern.match(module)
            if m:
                module = "lora_unet_" + sgm(*map(int, m.groups())) + module[m.end() :]
                break
        else:
            module = module.replace("text_encoder_2.", "lora_te2_").replace("text_encoder.", "lora_te1_")
        assert module.startswith(("lora_unet_", "lora_te1_", "lora_te2_")), key
        name = module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value.contiguous()
        if kind == "A.weight":
            kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    out.mkdir(parents=True, exist_ok=True)
    save_file(kohya, out / "kohya_sgm.safetensors")
    return out / "kohya_sgm.safetensors"


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("lora-sgm") / "tiny-sdxl-base")


@pytest.fixture(scope="module")
def files(xl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    out = tmp_path_factory.mktemp("sgm-loras")
    diffusers_file = make_xl_lora(xl_dir, out / "diffusers", seed=3)
    layers = int(json_config(xl_dir / "unet")["layers_per_block"])
    assert layers == 1, "the tiny SDXL stand-in is meant to differ from SDXL's 2 layers per block"
    return (
        diffusers_file,
        to_kohya_sgm(diffusers_file, out / "kohya", layers),
        to_kohya_sgm(diffusers_file, out / "kohya-unet", layers, unet_only=True),
    )


def json_config(directory: Path) -> dict:
    import json

    return json.loads((directory / "config.json").read_text(encoding="utf-8"))


def _parsed(path: Path):
    data = path.read_bytes()
    return parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest())


def test_sgm_names_fuse_like_the_diffusers_names(xl_dir: Path, files, tmp_path: Path):
    diffusers_file, sgm_file, _ = files
    sgm = _parsed(sgm_file)
    assert is_sgm_lora(sgm.sgm) and sgm.sgm_layers_per_block == 2  # parsed for SDXL's layout first
    pipeline = LoraText2ImagePipeline(
        tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(xl_dir.parent))
    )
    model = pipeline.model(ModelRef(str(xl_dir)))
    relaid = model.loras._laid_out([(sgm, 1.0)])[0][0]
    assert relaid.sgm_layers_per_block == 1
    plain = _parsed(diffusers_file)
    for component, weights in plain.factors.items():
        assert set(relaid.factors[component]) == set(weights), component
        for name, (up, down, ratio) in weights.items():
            up2, down2, ratio2 = relaid.factors[component][name]
            assert torch.equal(up, up2) and torch.equal(down.flatten(1), down2.flatten(1)), name
            assert ratio == ratio2
    assert model.loras.problems([(sgm, 1.0)]) == []


def test_sgm_lora_image_matches_diffusers(xl_dir: Path, files, tmp_path: Path):
    from diffusers import StableDiffusionXLPipeline

    _, _, sgm_file = files
    pipeline = LoraText2ImagePipeline(
        tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(xl_dir.parent))
    )
    request = LoraRequest(
        model=ModelRef(str(xl_dir)),
        prompt="a red fox",
        seed=7,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        negative_prompt="blurry",
        loras=((_parsed(sgm_file), 0.8),),
    )
    (result,) = pipeline([request])
    assert result.error is None, result.error
    ours = result.images.numpy().astype(np.int16)
    (base,) = pipeline([LoraRequest(**{**request.__dict__, "loras": ()})])

    reference = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(sgm_file.parent), weight_name=sgm_file.name)
    reference.fuse_lora(lora_scale=0.8)
    theirs = reference(
        prompt="a red fox",
        negative_prompt="blurry",
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images
    theirs = (theirs * 255).round().astype(np.int16)
    worst = int(np.abs(ours - theirs).max())
    moved = float(np.abs(ours - base.images.numpy().astype(np.int16)).mean())
    print(f"kohya SGM LoRA on SDXL: max {worst} levels vs diffusers; the LoRA moves {moved:.1f}")
    assert worst <= 1
    assert moved > 3, "the LoRA hardly changed the image: the test proves nothing"
