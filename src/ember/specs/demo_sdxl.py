"""A tiny random-weight stand-in of fal-ai/lcm's SDXL model, in diffusers format.

What it stands for (models.toml [lcm.sdxl]): stabilityai/stable-diffusion-xl-base-1.0 (two CLIP text
encoders and their tokenizers, the scheduler config, force_zeros_for_empty_prompt) with its UNet replaced by
latent-consistency/lcm-sdxl (the SDXL UNet distilled for LCM: time_cond_proj_dim=256) and its VAE by
madebyollin/sdxl-vae-fp16-fix. The stand-in is one pipeline directory holding those components in place,
i.e. what ember.specs.composite assembles from the three real repositories. Same classes, block types,
"text_time" added conditions, CLIP vocabulary (the second tokenizer pads with "!" as SDXL's does), the
base's EulerDiscreteScheduler config (the LCM scheduler is built from it, as lcm-sdxl's model card does),
a 4-block VAE with SDXL's scaling factor; only narrow layers. Fixed seed: two builds are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ember.specs.clip_bpe import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, write_clip_tokenizer

SEED = 0

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_BASE_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TEXT_HIDDEN = 32  # real: 768 (CLIP ViT-L)
TEXT_HIDDEN_2 = 32  # real: 1280 (OpenCLIP ViT-bigG)
PROJECTION_2 = 32  # real: 1280, the pooled text_embeds width
TIME_EMBED = 8  # addition_time_embed_dim; real: 256


def _clip_config(hidden: int, act: str, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # real: 12 / 32; hidden_states[-2] needs at least 2
        num_attention_heads=4,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,  # as the real configs; the tokenizers decide what pads
    )


def _unet(time_cond_proj_dim: int | None = 256, text_hidden_2: int = TEXT_HIDDEN_2) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128,  # 1024 px / 8
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),  # real: (320, 640, 1280)
        layers_per_block=1,  # real: 2
        transformer_layers_per_block=(1, 1, 2),  # real: (1, 2, 10)
        attention_head_dim=(2, 2, 4),  # real: (5, 10, 20)
        norm_num_groups=8,  # real: 32
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN + text_hidden_2,  # both encoders concatenated; real: 2048
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION_2,  # real: 2816
        time_cond_proj_dim=time_cond_proj_dim,  # lcm-sdxl's guidance-scale embedding width (256)
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # real: (128, 256, 512, 512)
        layers_per_block=1,  # real: 2
        latent_channels=4,
        norm_num_groups=8,
        sample_size=1024,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=False,  # sdxl-vae-fp16-fix: finite in fp16, no upcast needed
    )


def _pad_with_exclamation(tokenizer_dir: Path) -> None:
    """SDXL's tokenizer_2 pads with "!" (id 0) where tokenizer pads with <|endoftext|>: the penultimate
    hidden states at padded positions (and so the UNet's conditioning) depend on it."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["pad_token"] = "!"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_tiny_sdxl(directory: Path, text_hidden_2: int = TEXT_HIDDEN_2) -> Path:
    """The tiny SDXL *base* stand-in (fal-ai/lora's SDXL bases): build_tiny_lcm_sdxl's weights with a plain
    UNet (no time_cond_proj_dim: classifier-free guidance) and the base's EulerDiscreteScheduler.
    `text_hidden_2`: the second encoder's width; diffusers' from_single_file tells SDXL's two encoders
    apart by width (768 vs 1280), so a single-file stand-in needs it to differ from TEXT_HIDDEN."""
    return build_tiny_lcm_sdxl(directory, lcm=False, text_hidden_2=text_hidden_2)


def build_tiny_lcm_sdxl(directory: Path, lcm: bool = True, text_hidden_2: int = TEXT_HIDDEN_2) -> Path:
    """Build the tiny LCM SDXL pipeline into `directory` (model_index.json + component folders), written
    to a temporary sibling first and renamed, so a reader never sees half a model. `lcm=False`: the UNet
    without the guidance embedding (build_tiny_sdxl)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer_dir = write_clip_tokenizer(staging / "tokenizer-src")
        tokenizer_2_dir = write_clip_tokenizer(staging / "tokenizer-2-src")
        _pad_with_exclamation(tokenizer_2_dir)
        torch.manual_seed(SEED)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_clip_config(TEXT_HIDDEN, "quick_gelu", TEXT_HIDDEN)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(text_hidden_2, "gelu", PROJECTION_2)),
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
            tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_2_dir),
            unet=_unet(256 if lcm else None, text_hidden_2),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        # The base repo's file lists entries Euler does not take (clip_sample, set_alpha_to_one, ...);
        # the LCM scheduler built from it reads them, so the stand-in carries the file as published.
        scheduler_file = staging / "model" / "scheduler" / "scheduler_config.json"
        saved = json.loads(scheduler_file.read_text(encoding="utf-8"))
        scheduler_file.write_text(
            json.dumps({**saved, **SDXL_BASE_SCHEDULER}, indent=2) + "\n", encoding="utf-8"
        )
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
