"""The CLIP vision image encoder of IP-Adapters (transformers' CLIPVisionModelWithProjection), as
diffusers' StableDiffusionPipeline.encode_image calls it: pixel_values (B, 3, S, S), already preprocessed
by CLIPImageProcessor, -> the projected `image_embeds` (B, P) that plain IP-Adapters project, and the
penultimate hidden states (B, T, Dv) (T = (S / patch)^2 + 1) that IP-Adapter Plus / Full Face resample.

The encoder is named per request (fal-ai/lora's image_encoder_path / _subfolder / _weight_name), so `load`
is bound to its directory and weight file with `bind_image_encoder`. Weights load as safetensors only:
the pickled `pytorch_model.bin` that fal names by default is read from its `model.safetensors` twin.
Runs on the torch runtime only; no ONNX/TensorRT export is declared for it yet.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ember.specs.base import NetworkSpec, TensorSpec, randn_sample

# fal's default image_encoder_weight_name: a pickle, never unpickled here (see module docstring).
DEFAULT_WEIGHT_NAME = "pytorch_model.bin"


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S) -> (image_embeds (B, P), penultimate hidden states (B, T, Dv)): diffusers'
    encode_image reads `.image_embeds` for plain IP-Adapters and `.hidden_states[-2]` for the others."""

    def __init__(self, encoder: CLIPVisionModelWithProjection):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config.to_dict()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(pixel_values, output_hidden_states=True, return_dict=True)
        return out.image_embeds, out.hidden_states[-2]


def load_image_encoder(directory: str, weight_name: str, dtype: torch.dtype) -> nn.Module:
    """`directory` holds config.json and the weights. The default (pickled) name and model.safetensors
    load through from_pretrained with use_safetensors=True; any other *.safetensors name is built from the
    config and filled from that file (strictly: every weight present, none unknown)."""
    root = Path(directory)
    if weight_name in (DEFAULT_WEIGHT_NAME, "model.safetensors"):
        if not (root / "model.safetensors").is_file():
            raise ValueError(
                f"image encoder {directory} has no model.safetensors; pickled weights "
                f"({DEFAULT_WEIGHT_NAME}) are refused, convert them to safetensors"
            )
        model = CLIPVisionModelWithProjection.from_pretrained(
            root, dtype=dtype, use_safetensors=True, attn_implementation="sdpa"
        )
    elif weight_name.endswith(".safetensors") and "/" not in weight_name:
        from safetensors.torch import load_file

        config = CLIPVisionConfig.from_dict(json.loads((root / "config.json").read_text(encoding="utf-8")))
        model = CLIPVisionModelWithProjection(config)
        model.load_state_dict(load_file(root / weight_name), strict=True)
        model = model.to(dtype)
    else:
        raise ValueError(f"image_encoder_weight_name must be a .safetensors file name, not {weight_name!r}")
    return ImageEncoder(model.eval())


def _dims(config: Mapping[str, Any]) -> dict[str, int]:
    tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1  # patches + the class token
    return {
        "channels": 3,
        "clip_size": config["image_size"],
        "projection": config["projection_dim"],
        "tokens": tokens,
        "vision_hidden": config["hidden_size"],
    }


def _image_dims(batch: int, height: int, width: int) -> dict[str, int]:
    return {"batch": batch}  # the encoder's input size is fixed by its config, not by the output image


F32 = torch.float32

IMAGE_ENCODER = NetworkSpec(
    name="image_encoder",
    subfolder="image_encoder",
    version=1,
    inputs=(TensorSpec("pixel_values", F32, ("batch", "channels", "clip_size", "clip_size")),),
    outputs=(
        TensorSpec("image_embeds", F32, ("batch", "projection")),
        TensorSpec("hidden_states", F32, ("batch", "tokens", "vision_hidden")),
    ),
    load=lambda source, revision, dtype: load_image_encoder(source, DEFAULT_WEIGHT_NAME, dtype),
    static_dims=_dims,
    image_dims=_image_dims,
    sample=randn_sample,
)


def bind_image_encoder(weight_name: str) -> NetworkSpec:
    """IMAGE_ENCODER with `load` bound to a request's image_encoder_weight_name."""

    def load(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
        return load_image_encoder(source, weight_name, dtype)

    return dataclasses.replace(IMAGE_ENCODER, load=load)
