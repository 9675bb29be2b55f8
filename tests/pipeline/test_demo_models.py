"""The tiny demo model: the real LCM SD1.5 architecture, narrow, deterministic, loadable by from_pretrained."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ember.specs.demo_models import build_tiny_lcm_sd15


def _digest(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def test_rebuild_gives_identical_weights(tmp_path, lcm_artifacts) -> None:
    again = build_tiny_lcm_sd15(tmp_path / "again")
    assert _digest(again) == _digest(Path(lcm_artifacts.source))
    assert len(_digest(again)) == 3  # text_encoder, unet, vae


def test_architecture_keeps_what_the_pipeline_relies_on(lcm_artifacts) -> None:
    source = lcm_artifacts.source
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    text = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    scheduler = LCMScheduler.from_pretrained(source, subfolder="scheduler")
    assert unet.config.time_cond_proj_dim == 256  # LCM guidance embedding
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 512 px <-> 64 px latents
    assert (text.config.vocab_size, text.config.max_position_embeddings) == (49408, 77)
    assert scheduler.config.original_inference_steps == 50 and scheduler.config.timestep_scaling == 10.0
