"""Tiny random-weight IP-Adapter for fal-ai/lora tests and the offline demo, laid out as h94/IP-Adapter is:

    <dir>/models/ip-adapter_sd15.safetensors      image_proj.* + ip_adapter.* (diffusers' IP-Adapter format)
    <dir>/models/image_encoder/                   CLIPVisionModelWithProjection (config.json, model.safetensors)

The adapter is a plain IP-Adapter (ImageProjection: image_embeds (P) -> 4 tokens of the UNet's
cross-attention width) with one to_k_ip / to_v_ip pair per cross-attention layer of the UNet it is built
for, keyed as the original checkpoints are ("1.to_k_ip.weight", "3.to_k_ip.weight", ...: odd ids, one per
attn2 in `attn_processors` order), which diffusers' load_ip_adapter converts.
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


def _image_encoder() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,  # real: 14 -> 16 patches + the class token
        hidden_size=16,  # real: 1280
        intermediate_size=32,
        num_hidden_layers=2,  # real: 32
        num_attention_heads=2,
        projection_dim=PROJECTION,
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


def ip_adapter_state_dict(unet_config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights for a UNet of `unet_config`, flat "image_proj.*" / "ip_adapter.*" keys."""
    cross = unet_config["cross_attention_dim"]
    std = 0.2  # large enough that the image visibly steers the tiny UNet, small enough to stay stable
    state = {
        "image_proj.proj.weight": torch.randn(cross * TOKENS, PROJECTION, generator=generator) * std,
        "image_proj.proj.bias": torch.randn(cross * TOKENS, generator=generator) * std,
        "image_proj.norm.weight": 1 + torch.randn(cross, generator=generator) * std,
        "image_proj.norm.bias": torch.randn(cross, generator=generator) * std,
    }
    with torch.device("meta"):  # only the processor names are needed, not the weights
        names = list(UNet2DConditionModel.from_config(unet_config).attn_processors)
    key_id = 1
    for name in names:
        if name.endswith("attn1.processor"):  # self-attention: no image tokens
            continue
        hidden = _hidden_size(unet_config, name)
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{kind}.weight"] = (
                torch.randn(hidden, cross, generator=generator) * std
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
