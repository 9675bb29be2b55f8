"""Tiny random-weight IP-Adapter for fal-ai/lora tests and the offline demo, laid out as h94/IP-Adapter is:

    <dir>/models/ip-adapter_sd15.safetensors      image_proj.* + ip_adapter.* (diffusers' IP-Adapter format)
    <dir>/models/image_encoder/                   CLIPVisionModelWithProjection (config.json, model.safetensors)

The adapter is a plain IP-Adapter (ImageProjection: image_embeds (P) -> 4 tokens of the UNet's
cross-attention width) with one to_k_ip / to_v_ip pair per cross-attention layer of the UNet it is built
for, keyed as the original checkpoints are ("1.to_k_ip.weight", "3.to_k_ip.weight", ...: odd ids, one per
attn2 in `attn_processors` order), which diffusers' load_ip_adapter converts.

For SDXL bases, `build_tiny_ip_adapter_sdxl` lays out h94/IP-Adapter's SDXL files:

    <dir>/sdxl_models/ip-adapter_sdxl.safetensors           plain: ImageProjection of the ViT-bigG encoder's
                                                            image_embeds
    <dir>/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors  Plus: the Resampler over the ViT-H encoder's
                                                            penultimate hidden states (original key names:
                                                            layers.i.0.to_kv, layers.i.1.1, ...)
    <dir>/sdxl_models/image_encoder/                        the (tiny) ViT-bigG CLIP vision encoder
    <dir>/models/image_encoder/                             the (tiny) ViT-H one (image_encoder_subfolder)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

WEIGHT_NAME = "ip-adapter_sd15.safetensors"
SUBFOLDER = "models"
IMAGE_SIZE = 32  # real (ViT-H/14): 224
PROJECTION = 24  # real: 1024
TOKENS = 4  # plain IP-Adapter: image embedding -> 4 extra cross-attention tokens
STD = 0.2  # large enough that the image visibly steers the tiny UNet, small enough to stay stable

XL_SUBFOLDER = "sdxl_models"
XL_WEIGHT_NAME = "ip-adapter_sdxl.safetensors"
XL_PLUS_WEIGHT_NAME = "ip-adapter-plus_sdxl_vit-h.safetensors"
XL_PROJECTION = 32  # the tiny ViT-bigG's image_embeds width; real: 1280
PLUS_HIDDEN = 64  # Resampler width; real: 1280. diffusers reads heads = width // 64 (dim_head 64)
PLUS_QUERIES = 4  # image tokens the Resampler makes; real: 16
PLUS_DEPTH = 4  # diffusers' IPAdapterPlusImageProjection has 4 blocks (the originals' depth)


def _image_encoder(hidden: int = 16, projection: int = PROJECTION) -> CLIPVisionModelWithProjection:
    """Tiny ViT-H (the defaults; real hidden 1280, projection 1024) or ViT-bigG (real 1664, 1280)."""
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,  # real: 14 -> 16 patches + the class token
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,  # real: 32 / 48
        num_attention_heads=2,
        projection_dim=projection,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config)


def _hidden_size(config: dict, name: str) -> int:
    """The channel width of the attention block `name` (an attn_processors key), as diffusers reads it."""
    channels = list(config["block_out_channels"])
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name[len("up_blocks.")])]
    return channels[int(name[len("down_blocks.")])]


def ip_adapter_state_dict(
    unet_config: dict, generator: torch.Generator, projection: int = PROJECTION
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights for a UNet of `unet_config`, flat "image_proj.*" / "ip_adapter.*" keys;
    `projection`: the image encoder's image_embeds width P."""
    cross = unet_config["cross_attention_dim"]
    state = {
        "image_proj.proj.weight": torch.randn(cross * TOKENS, projection, generator=generator) * STD,
        "image_proj.proj.bias": torch.randn(cross * TOKENS, generator=generator) * STD,
        "image_proj.norm.weight": 1 + torch.randn(cross, generator=generator) * STD,
        "image_proj.norm.bias": torch.randn(cross, generator=generator) * STD,
    }
    state.update(_ip_attention(unet_config, generator))
    return state


def _ip_attention(unet_config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One random to_k_ip / to_v_ip pair (hidden, cross) per attn2 of the UNet, keyed as the originals."""
    cross = unet_config["cross_attention_dim"]
    state = {}
    with torch.device("meta"):  # only the processor names are needed, not the weights
        names = list(UNet2DConditionModel.from_config(unet_config).attn_processors)
    key_id = 1
    for name in names:
        if name.endswith("attn1.processor"):  # self-attention: no image tokens
            continue
        hidden = _hidden_size(unet_config, name)
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{kind}.weight"] = (
                torch.randn(hidden, cross, generator=generator) * STD
            )
        key_id += 2
    return state


def build_tiny_ip_adapter(directory: Path, base_model: Path, seed: int = 0) -> Path:
    """Write the tiny IP-Adapter for the SD1.5 model at `base_model` (diffusers directory) into `directory`."""
    directory = Path(directory)
    unet_config = json.loads((Path(base_model) / "unet" / "config.json").read_text(encoding="utf-8"))
    generator = torch.Generator().manual_seed(seed)
    models = directory / SUBFOLDER
    models.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state_dict(unet_config, generator), models / WEIGHT_NAME)
    torch.manual_seed(seed)
    _image_encoder().save_pretrained(models / "image_encoder", safe_serialization=True)
    return directory


def ip_adapter_plus_state_dict(
    unet_config: dict, vision_hidden: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter Plus weights: the Resampler (latent queries attending over the encoder's hidden
    states (T, vision_hidden) -> (PLUS_QUERIES, cross)) under the original checkpoints' key names, which
    diffusers' load_ip_adapter converts (to_kv split into to_k / to_v, `1.1` -> ff.1.net.0.proj, ...)."""
    cross, width = unet_config["cross_attention_dim"], PLUS_HIDDEN
    inner = 64 * (width // 64)  # heads x dim_head
    rand = lambda *shape: torch.randn(*shape, generator=generator) * STD
    state = {
        "image_proj.latents": torch.randn(1, PLUS_QUERIES, width, generator=generator) / width**0.5,
        "image_proj.proj_in.weight": rand(width, vision_hidden),
        "image_proj.proj_in.bias": rand(width),
        "image_proj.proj_out.weight": rand(cross, width),
        "image_proj.proj_out.bias": rand(cross),
        "image_proj.norm_out.weight": 1 + rand(cross),
        "image_proj.norm_out.bias": rand(cross),
    }
    for i in range(PLUS_DEPTH):
        layer = f"image_proj.layers.{i}"
        for norm in (f"{layer}.0.norm1", f"{layer}.0.norm2", f"{layer}.1.0"):  # LayerNorms (width,)
            state[f"{norm}.weight"], state[f"{norm}.bias"] = 1 + rand(width), rand(width)
        state[f"{layer}.0.to_q.weight"] = rand(inner, width)
        state[f"{layer}.0.to_kv.weight"] = rand(2 * inner, width)
        state[f"{layer}.0.to_out.weight"] = rand(width, inner)
        state[f"{layer}.1.1.weight"] = rand(4 * width, width)  # feed-forward, ratio 4, no biases
        state[f"{layer}.1.3.weight"] = rand(width, 4 * width)
    state.update(_ip_attention(unet_config, generator))
    return state


def build_tiny_ip_adapter_sdxl(directory: Path, base_model: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL IP-Adapters (plain and Plus) and both image encoders for the SDXL model at
    `base_model` into `directory`, laid out as h94/IP-Adapter (module docstring)."""
    directory = Path(directory)
    unet_config = json.loads((Path(base_model) / "unet" / "config.json").read_text(encoding="utf-8"))
    generator = torch.Generator().manual_seed(seed)
    xl = directory / XL_SUBFOLDER
    xl.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state_dict(unet_config, generator, XL_PROJECTION), xl / XL_WEIGHT_NAME)
    torch.manual_seed(seed)
    vit_h = _image_encoder()
    vit_h.save_pretrained(directory / SUBFOLDER / "image_encoder", safe_serialization=True)
    _image_encoder(hidden=24, projection=XL_PROJECTION).save_pretrained(
        xl / "image_encoder", safe_serialization=True
    )
    plus = ip_adapter_plus_state_dict(unet_config, vit_h.config.hidden_size, generator)
    save_file(plus, xl / XL_PLUS_WEIGHT_NAME)
    return directory
