"""Tiny random-weight stand-in of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, saved in diffusers format.

Same classes and config shape as the real repository: a T5EncoderModel (T5 v1.1: gated-gelu, no tied
embeddings) with a T5 sentencepiece tokenizer (trained here, see t5_spm.py), a PixArtTransformer2DModel with
Σ's settings (sample_size 128 = 1024 px, patch 2, ada_norm_single, learned sigma: out_channels 8,
interpolation_scale 2, caption_channels = T5 d_model, use_additional_conditions False), an AutoencoderKL
with SDXL's 4 blocks and scaling factor, and the repository's DPMSolverMultistepScheduler config. Only the
widths and depths are small. Weights come from a fixed torch seed, so two builds are identical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from ember.specs.t5_spm import write_t5_tokenizer

SEED = 0
T5_D_MODEL = 32  # real: 4096 (t5-v1_1-xxl)

# scheduler/scheduler_config.json of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (the PixArt-α/Σ DPM-Solver++
# setup: linear betas 1e-4..0.02 over 1000 steps, 2nd-order multistep, linspace spacing). Written from the
# published config, which cannot be fetched here; `source` in models.toml loads the real file in production.
PIXART_SIGMA_SCHEDULER = {
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}


def _text_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_D_MODEL,
        d_kv=8,  # real: 64
        d_ff=64,  # real: 10240
        num_layers=2,  # real: 24
        num_heads=4,  # real: 64
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # T5 v1.1
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _transformer() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        # One head, one block: fal's default request is 1024 px, i.e. 4096 image tokens, and self-attention
        # over them is ~95 % of a tiny model's step (0.27 s per block and head on 2 CPU cores, measured with
        # onnxruntime); fal's example (35 steps, 1024 px, guidance) must stay a test of seconds. The code
        # paths are the same for more heads and blocks.
        num_attention_heads=1,  # real: 16
        attention_head_dim=16,  # real: 72
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=1,  # real: 28
        cross_attention_dim=16,  # = heads x head_dim; real: 1152
        attention_bias=True,
        sample_size=128,  # 1024 px / 8: the default size and the positional-embedding base
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=2,
        use_additional_conditions=False,  # Σ: no resolution / aspect-ratio embedding
        caption_channels=T5_D_MODEL,
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
        sample_size=1024,
        scaling_factor=0.13025,  # SDXL's VAE, which PixArt-Σ uses
        # The real VAE has self-attention in its mid block; at 1024 px that is attention over 16,384 latent
        # pixels, 20 of the 60 s a tiny 1024 px request took on 2 CPU cores. The decoder code path is the
        # same without it (the loader reads the flag from vae/config.json).
        mid_block_add_attention=False,
    )


def build_tiny_pixart_sigma(directory: Path) -> Path:
    """Build the tiny PixArt-Σ pipeline into `directory` (model_index.json + component folders).

    Written to a temporary sibling first and renamed, so a reader never sees half a model.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(write_t5_tokenizer(staging / "tokenizer-src"))
        torch.manual_seed(SEED)
        pipe = PixArtSigmaPipeline(
            tokenizer=tokenizer,
            text_encoder=_text_encoder(len(tokenizer)),
            vae=_vae(),
            transformer=_transformer(),
            scheduler=DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER),
        )
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
