"""A tiny random-weight Stable Cascade (Würstchen v3) in diffusers format, for offline demos and tests.

Mirrors the layout of `stabilityai/stable-cascade` (the source models.toml names): a
StableCascadeDecoderPipeline at the root (tokenizer, text_encoder, decoder, scheduler, vqgan,
model_index.json) plus the stage C UNet in `prior/`. The real prior and decoder repos use one and the same
text encoder (CLIP ViT-bigG/14 with projection) and DDPMWuerstchenScheduler, so one copy serves both stages.

Same classes and block structure as the real configs (prior/config.json and decoder/config.json of
stabilityai/stable-cascade-prior and stabilityai/stable-cascade, vqgan/config.json), only narrow and
shallow: the prior keeps `switch_level=[False]` (no spatial downscaling, 16 latent channels, "sca"+"crp"
timestep conditioning, text + pooled text + image conditioning); the decoder keeps patch_size 4, four
levels, attention only in the two deepest, effnet and pixel mappers and "sca" conditioning; the VQGAN
keeps 2 levels (x4 upscale) and 4 latent channels. Weights come from a fixed torch seed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from ember.specs.clip_bpe import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, write_clip_tokenizer

SEED = 0
TEXT_HIDDEN = 32  # real: 1280 (CLIP ViT-bigG/14); also the projection (pooled) width
PRIOR_CHANNELS = 16  # stage C latent channels, as the real prior (the decoder's effnet input)
CLIP_IMAGE_CHANNELS = 24  # real: 768 (CLIP ViT-L image embeddings; zeros for text-to-image)

BLOCKS_ATTN = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")
BLOCKS_NO_ATTN = ("SDCascadeResBlock", "SDCascadeTimestepBlock")


def _text_encoder() -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,  # real: 5120
        num_hidden_layers=2,  # real: 32
        num_attention_heads=4,  # real: 20
        projection_dim=TEXT_HIDDEN,  # real: 1280
        hidden_act="gelu",  # bigG uses gelu, not quick_gelu
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config)


def _prior() -> StableCascadeUNet:
    return StableCascadeUNet(
        in_channels=PRIOR_CHANNELS,
        out_channels=PRIOR_CHANNELS,
        timestep_ratio_embedding_dim=64,
        patch_size=1,
        conditioning_dim=32,  # real: 2048
        block_out_channels=(32, 32),  # real: (2048, 2048)
        num_attention_heads=(2, 2),  # real: (32, 32)
        down_num_layers_per_block=(1, 1),  # real: (8, 24)
        up_num_layers_per_block=(1, 1),  # real: (24, 8)
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(BLOCKS_ATTN, BLOCKS_ATTN),
        clip_text_in_channels=TEXT_HIDDEN,
        clip_text_pooled_in_channels=TEXT_HIDDEN,
        clip_image_in_channels=CLIP_IMAGE_CHANNELS,
        clip_seq=4,
        kernel_size=3,
        dropout=(0.1, 0.1),
        self_attn=True,
        timestep_conditioning_type=("sca", "crp"),
        switch_level=(False,),
    )


def _decoder() -> StableCascadeUNet:
    return StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=64,
        patch_size=4,
        conditioning_dim=32,  # real: 1280
        block_out_channels=(8, 16, 32, 32),  # real: (320, 640, 1280, 1280)
        num_attention_heads=(0, 0, 2, 2),  # real: (0, 0, 20, 20)
        down_num_layers_per_block=(1, 1, 1, 1),  # real: (2, 6, 28, 6)
        up_num_layers_per_block=(1, 1, 1, 1),  # real: (6, 28, 6, 2)
        down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(2, 2, 1, 1),  # real: (3, 3, 2, 2)
        block_types_per_layer=(BLOCKS_NO_ATTN, BLOCKS_NO_ATTN, BLOCKS_ATTN, BLOCKS_ATTN),
        clip_text_pooled_in_channels=TEXT_HIDDEN,
        clip_seq=4,
        effnet_in_channels=PRIOR_CHANNELS,
        pixel_mapper_in_channels=3,  # RGB 8x8 "pixels" conditioning (zeros for text-to-image)
        kernel_size=3,
        dropout=(0.0, 0.0, 0.1, 0.1),
        self_attn=True,
        timestep_conditioning_type=("sca",),
        switch_level=None,
    )


def _vqgan() -> PaellaVQModel:
    return PaellaVQModel(
        in_channels=3,
        out_channels=3,
        up_down_scale_factor=2,
        levels=2,  # x4 between latent and pixels, as the real one
        bottleneck_blocks=1,  # real: 12
        embed_dim=16,  # real: 384
        latent_channels=4,
        num_vq_embeddings=64,  # real: 8192
        scale_factor=0.3764,
    )


def build_tiny_stable_cascade(directory: Path) -> Path:
    """Build the tiny Stable Cascade into `directory`; staged in a sibling and renamed, as for LCM."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer_dir = write_clip_tokenizer(staging / "tokenizer-src")
        torch.manual_seed(SEED)
        text_encoder, prior, decoder, vqgan = _text_encoder(), _prior(), _decoder(), _vqgan()
        pipe = StableCascadeDecoderPipeline(
            decoder=decoder.eval(),
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
            text_encoder=text_encoder.eval(),
            scheduler=DDPMWuerstchenScheduler(),  # the real repos use the defaults (scaler 1, s 0.008)
            vqgan=vqgan.eval(),
        )
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        prior.eval().save_pretrained(staging / "model" / "prior", safe_serialization=True)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
