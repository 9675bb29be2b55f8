"""Full-size architectures with random weights, built from the real configs (no hub access needed).

Each config below is the `config.json` of the named Hugging Face repository, written out (only the keys that
differ from the diffusers/transformers defaults). Random weights run exactly as fast as trained ones, so
latency, throughput, memory and FLOPs are those of the real models. Pass `scale` < 1 to shrink the widths
and depths for smoke tests (the structure stays the same).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

# SimianLuo/LCM_Dreamshaper_v7 unet: the SD1.5 UNet (859.5M parameters) + the LCM guidance embedding.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_LCM_UNET = {**SD15_UNET, "time_cond_proj_dim": 256}
# runwayml/stable-diffusion-v1-5 vae (83.7M), the same for every SD1.5 derivative.
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# openai/clip-vit-large-patch14 text tower (123M): SD1.5's text encoder.
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# stabilityai/stable-diffusion-xl-base-1.0: unet (2.57B), text_encoder_2 (OpenCLIP bigG, 695M), vae.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer (611M) and its T5-v1.1-XXL encoder (4.76B).
PIXART_SIGMA: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "sample_size": 128,
    "patch_size": 2,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "num_embeds_ada_norm": 1000,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "is_encoder_decoder": False,
}
# stabilityai/stable-cascade-prior prior (3.6B) and stabilityai/stable-cascade decoder (1.56B).
CASCADE_PRIOR: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "conditioning_dim": 2048,
    "block_out_channels": [2048, 2048],
    "num_attention_heads": [32, 32],
    "down_num_layers_per_block": [8, 24],
    "up_num_layers_per_block": [24, 8],
    "down_blocks_repeat_mappers": [1, 1],
    "up_blocks_repeat_mappers": [1, 1],
    "block_types_per_layer": [
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
    ],
    "clip_text_in_channels": 1280,
    "clip_text_pooled_in_channels": 1280,
    "clip_image_in_channels": 768,
    "clip_seq": 4,
    "kernel_size": 3,
    "dropout": [0.1, 0.1],
    "self_attn": True,
    "timestep_conditioning_type": ["sca", "crp"],
    "switch_level": [False],
    "patch_size": 1,
    "timestep_ratio_embedding_dim": 64,
    "effnet_in_channels": None,
    "pixel_mapper_in_channels": None,
}
CASCADE_DECODER: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "conditioning_dim": 1280,
    "block_out_channels": [320, 640, 1280, 1280],
    "num_attention_heads": [0, 0, 20, 20],
    "down_num_layers_per_block": [2, 6, 28, 6],
    "up_num_layers_per_block": [6, 28, 6, 2],
    "down_blocks_repeat_mappers": [1, 1, 1, 1],
    "up_blocks_repeat_mappers": [3, 3, 2, 2],
    "block_types_per_layer": [
        ["SDCascadeResBlock", "SDCascadeTimestepBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
    ],
    "clip_text_pooled_in_channels": 1280,
    "clip_seq": 4,
    "effnet_in_channels": 16,
    "pixel_mapper_in_channels": 3,  # the default `pixels` input is (B, 3, 8, 8)
    "kernel_size": 3,
    "dropout": [0, 0, 0.1, 0.1],
    "self_attn": True,
    "timestep_conditioning_type": ["sca"],
    "patch_size": 4,
    "timestep_ratio_embedding_dim": 64,
    "clip_text_in_channels": None,
    "clip_image_in_channels": None,
    "switch_level": None,
}
# monster-labs/control_v1p_sd15_qrcode_monster: an SD1.5 ControlNet (361M), what fal-ai/illusion-diffusion runs.
SD15_CONTROLNET: dict[str, Any] = {
    k: v for k, v in SD15_UNET.items() if k not in ("out_channels", "up_block_types", "sample_size")
}


def shrink(config: dict[str, Any], scale: float) -> dict[str, Any]:
    """A smaller model of the same structure for smoke tests: widths and layer counts times `scale`, attention
    heads cut to 2 so every width stays divisible (multiples of 32 keep GroupNorm's 32 groups valid)."""
    if scale >= 1:
        return config
    out = copy.deepcopy(config)

    def width(c: int) -> int:
        return max(32, int(c * scale) // 32 * 32)

    if "block_out_channels" in out:
        out["block_out_channels"] = [width(c) for c in out["block_out_channels"]]
    for key in (
        "hidden_size",
        "d_model",
        "intermediate_size",
        "d_ff",
        "cross_attention_dim",
        "caption_channels",
        "conditioning_dim",
        "projection_dim",
        "clip_text_in_channels",
        "clip_text_pooled_in_channels",
        "clip_image_in_channels",
    ):
        if out.get(key):
            out[key] = width(out[key])
    for key in ("num_hidden_layers", "num_layers"):
        if key in out:
            out[key] = max(1, int(out[key] * scale))
    heads = out.get("num_attention_heads")
    if isinstance(heads, list):  # Stable Cascade: per level, 0 = no attention
        out["num_attention_heads"] = [2 if h else 0 for h in heads]
    elif heads:
        out["num_attention_heads"] = 2
    if "attention_head_dim" in out:  # diffusers UNets: heads per level; PixArt: the head width
        head = out["attention_head_dim"]
        out["attention_head_dim"] = [2] * len(head) if isinstance(head, list) else 2
        if "caption_channels" in out:  # PixArt: inner width = heads x head width = cross_attention_dim
            out["attention_head_dim"] = out["cross_attention_dim"] // 2
    if "num_heads" in out:  # T5
        out["num_heads"], out["d_kv"] = 2, 16
    if "transformer_layers_per_block" in out:
        out["transformer_layers_per_block"] = [1] * len(out["transformer_layers_per_block"])
    for key in ("down_num_layers_per_block", "up_num_layers_per_block"):
        if key in out:
            out[key] = [max(1, int(n * scale)) for n in out[key]]
    return out


def build(
    kind: str, config: dict[str, Any], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> nn.Module:
    """A random-weight model of one diffusers/transformers class from its config."""
    import diffusers
    import transformers

    classes = {
        "unet": diffusers.UNet2DConditionModel,
        "vae": diffusers.AutoencoderKL,
        "pixart": diffusers.PixArtTransformer2DModel,
        "cascade": diffusers.StableCascadeUNet,
        "controlnet": diffusers.ControlNetModel,
    }
    with torch.device(device):
        if kind in classes:
            model = classes[kind].from_config(config)
        elif kind == "clip":
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
        elif kind == "clip_projection":
            model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config))
        elif kind == "t5":
            model = transformers.T5EncoderModel(transformers.T5Config(**config))
        else:
            raise ValueError(f"unknown architecture kind {kind!r}")
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
