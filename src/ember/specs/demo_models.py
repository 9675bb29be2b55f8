"""Tiny random-weight stand-ins of real architectures, saved in diffusers format for offline demos and tests.

`build_tiny_lcm_sd15` mirrors SimianLuo/LCM_Dreamshaper_v7 (SD1.5 + LCM-distilled UNet): the same classes,
block types, CLIP vocabulary and context length, the LCM guidance embedding (time_cond_proj_dim=256), a
4-block VAE (so 512 px images have 64 px latents) and that repo's scheduler config, only with narrow layers.
It is loaded back through `from_pretrained(path)`, the same code path as the hub id. Weights come from a
fixed torch seed, so two builds are identical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ember.specs.clip_bpe import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, write_clip_tokenizer

SEED = 0

# scheduler/scheduler_config.json of SimianLuo/LCM_Dreamshaper_v7.
LCM_DREAMSHAPER_V7_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

TEXT_HIDDEN = 32  # real: 768


def _text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,  # real: 3072
        num_hidden_layers=2,  # real: 12
        num_attention_heads=4,  # real: 12
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,  # 512 px / 8
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),  # real: (320, 640, 1280, 1280)
        # As real: 2 resnets per block give SD1.5's 12 + 1 skip connections, the residuals an SD1.5
        # ControlNet adds (controlnet_inpaint, ember.specs.controlnet.CONTROLLED_LCM_UNET).
        layers_per_block=2,
        attention_head_dim=2,  # diffusers' name for the head count in SD1.5 configs; real: 8
        norm_num_groups=8,  # real: 32
        cross_attention_dim=TEXT_HIDDEN,
        time_cond_proj_dim=256,  # as the real LCM UNet: guidance-scale embedding width
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # real: (128, 256, 512, 512); 4 blocks keep the scale at 8
        layers_per_block=1,  # real: 2
        latent_channels=4,
        norm_num_groups=8,  # real: 32
        sample_size=512,
        scaling_factor=0.18215,
    )


def build_tiny_lcm_sd15(directory: Path) -> Path:
    """Build the tiny LCM SD1.5 pipeline into `directory` (model_index.json + component folders).

    Written to a temporary sibling first and renamed, so a reader never sees half a model.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer_dir = write_clip_tokenizer(staging / "tokenizer-src")
        torch.manual_seed(SEED)
        pipe = LatentConsistencyModelPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(),
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=_unet(),
            scheduler=LCMScheduler(**LCM_DREAMSHAPER_V7_SCHEDULER),
            # The safety checker is a later issue; the real repo ships one, the demo does not.
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
