"""A tiny random-weight Stable Diffusion 1.5 base model (plain UNet, no LCM distillation) for fal-ai/lora
tests and the offline demo: runwayml/stable-diffusion-v1-5's classes, block types, CLIP vocabulary and
scheduler config (PNDM), with the narrow text encoder and VAE of ember.specs.demo_models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from ember.specs.clip_bpe import write_clip_tokenizer
from ember.specs.demo_models import TEXT_HIDDEN, _text_encoder, _vae

SEED = 0

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5.
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64),  # real: (320, 640, 1280, 1280)
        layers_per_block=1,
        attention_head_dim=2,
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN,
    )


def build_tiny_sd15(directory: Path, seed: int = SEED) -> Path:
    """Build the tiny SD1.5 pipeline into `directory`; `seed` picks other random weights."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer_dir = write_clip_tokenizer(staging / "tokenizer-src")
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(),
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=_unet(),
            scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
