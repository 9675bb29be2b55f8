"""Tiny random-weight stand-ins for fal-ai/illusion-diffusion: a plain SD1.5 base whose UNet has SD1.5's
real layout (4 down blocks x 2 layers, so the 12 + 1 ControlNet residuals of ember.specs.controlnet), and a
ControlNetModel that fits it (monster-labs/control_v1p_sd15_qrcode_monster's classes and block types).
For fal-ai/lcm's controlnet_inpaint: an inpaint ControlNet (lllyasviel/control_v11p_sd15_inpaint's
classes) that fits the tiny LCM UNet of ember.specs.demo_models.

ControlNet training starts from zero convolutions; a random demo keeps them zero would make every residual
zero and every ControlNet test vacuous, so here they get small random weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from ember.specs.clip_bpe import write_clip_tokenizer
from ember.specs.demo_models import TEXT_HIDDEN, _text_encoder, _vae
from ember.specs.demo_models import _unet as _lcm_unet

SEED = 0
CONTROLNET_SEED = 1
INPAINT_CONTROLNET_SEED = 2

# scheduler/scheduler_config.json of stable-diffusion-v1-5/stable-diffusion-v1-5 (PNDM; fal's schedulers
# are built from its betas with from_config).
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

# Shared by the UNet and the ControlNet: a ControlNet is a copy of the UNet's encoder.
_BLOCKS = {
    "in_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "block_out_channels": (16, 16, 32, 32),  # real: (320, 640, 1280, 1280)
    "layers_per_block": 2,  # as real SD1.5: the residual count depends on it
    "attention_head_dim": 2,  # real: 8
    "norm_num_groups": 8,  # real: 32
    "cross_attention_dim": TEXT_HIDDEN,
}


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,
        out_channels=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        **_BLOCKS,
    )


def _controlnet() -> ControlNetModel:
    controlnet = ControlNetModel(
        conditioning_channels=3,
        conditioning_embedding_out_channels=(8, 16, 16, 32),  # real: (16, 32, 96, 256)
        **_BLOCKS,
    )
    return _unzero(controlnet)


def _unzero(controlnet: ControlNetModel) -> ControlNetModel:
    """Small random weights in the zero convolutions (see the module docstring)."""
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.normal_(conv.bias, std=0.05)
    return controlnet


def _inpaint_controlnet() -> ControlNetModel:
    """lllyasviel/control_v11p_sd15_inpaint's shape for the tiny LCM UNet (ember.specs.demo_models): the
    UNet's encoder layout (diffusers' ControlNetModel.from_unet, which leaves out the LCM guidance
    embedding, as the real inpaint ControlNet has none; random weights rather than the UNet's, whose
    time embedding carries that guidance projection); 3 conditioning channels: the image, masked pixels -1."""
    return _unzero(
        ControlNetModel.from_unet(
            _lcm_unet(), conditioning_embedding_out_channels=(8, 16, 16, 32), load_weights_from_unet=False
        )
    )


def _build_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling, then rename: a reader never sees half a model."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def build_tiny_sd15_base(directory: Path) -> Path:
    """A plain (non-LCM) SD1.5 pipeline with SD1.5's UNet layout, into `directory`."""

    def write(staging: Path) -> None:
        tokenizer_dir = write_clip_tokenizer(staging / "tokenizer-src")
        torch.manual_seed(SEED)
        StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(),
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=_unet(),
            scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(staging / "model", safe_serialization=True)

    return _build_atomically(directory, write)


def build_tiny_controlnet(directory: Path, seed: int = CONTROLNET_SEED, variant: str | None = None) -> Path:
    """A ControlNetModel fitting build_tiny_sd15_base, config.json at the root of `directory`; `seed` picks
    other random weights, `variant` saves them as diffusion_pytorch_model.<variant>.safetensors."""

    def write(staging: Path) -> None:
        torch.manual_seed(seed)
        _controlnet().save_pretrained(staging / "model", safe_serialization=True, variant=variant)

    return _build_atomically(directory, write)


def build_tiny_inpaint_controlnet(directory: Path) -> Path:
    """An inpaint ControlNetModel fitting the tiny LCM SD1.5 (build_tiny_lcm_sd15), config.json at the root."""

    def write(staging: Path) -> None:
        torch.manual_seed(INPAINT_CONTROLNET_SEED)
        _inpaint_controlnet().save_pretrained(staging / "model", safe_serialization=True)

    return _build_atomically(directory, write)
