"""The networks of an SDXL base model as fal-ai/lora runs it: both CLIP text encoders exposing the hidden
states `clip_skip` picks from, the plain (non-LCM) SDXL UNet of ember.specs.sdxl called with
classifier-free guidance, and the VAE decoder of ember.specs.sd15 (SDXL's VAE has SD1.5's architecture).

diffusers' StableDiffusionXLPipeline.encode_prompt reads `hidden_states[-(clip_skip + 2)]` of each encoder
(clip_skip None: the penultimate layer) with no final layer norm (unlike SD1.5's), and the pooled
`text_embeds` of the second encoder whatever clip_skip is (and it encodes the negative prompt at
hidden_states[-2] whatever clip_skip is: ember.pipeline.lora_xl). The encoders here return all three choices at
once: (B, 3, 77, D) for fal's clip_skip 0, 1, 2.

The base model is named per request, so `load` is bound to the request's `variant` and custom UNet
(`unet_name`) with `bind_xl_loaders`. On the torch runtime they load the directory directly; on
onnxruntime ember.pipeline.base_models exports them once (artifact family ("lora", "sdxl")), with refit
maps, so LoRAs on the UNet and both encoders refit the ONNX Runtime sessions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.lora import UNET_TRACE_DIMS, UNET_VERIFY_DIMS, load_base_unet
from ember.specs.sd15 import TEXT_LENGTH, VAE_DECODER, _image_dims, _load_vae_decoder, _sample
from ember.specs.sdxl import UNET as SDXL_UNET
from ember.specs.sdxl import XLUNet, _load_xl_unet, _unet_dims

# clip_skip in 0..2 (fal's range): each encoder returns one hidden state per value.
CLIP_SKIPS = 3


def _skipped(out: Any) -> torch.Tensor:
    """(B, 3, 77, D): hidden_states[-2], [-3], [-4] (diffusers' clip_skip None / 1 / 2 for SDXL)."""
    return torch.stack([out.hidden_states[-(skip + 2)] for skip in range(CLIP_SKIPS)], dim=1)


class XLClipSkipTextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> hidden_states (B, 3, 77, D) of CLIPTextModel (SDXL's first encoder)."""

    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _skipped(self.text_encoder(input_ids, output_hidden_states=True))


class XLClipSkipTextEncoderWithProjection(nn.Module):
    """input_ids (B, 77) int64 -> hidden_states (B, 3, 77, D2) and the projected pooled text_embeds (B, P)
    of CLIPTextModelWithProjection (SDXL's second encoder)."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return _skipped(out), out.text_embeds


def _load_text_encoder(source: str, revision: str | None, dtype: torch.dtype, variant: str | None = None):
    model = CLIPTextModel.from_pretrained(
        source,
        subfolder="text_encoder",
        revision=revision,
        dtype=dtype,
        variant=variant,
        attn_implementation="sdpa",
    )
    return XLClipSkipTextEncoder(model.eval())


def _load_text_encoder_2(source: str, revision: str | None, dtype: torch.dtype, variant: str | None = None):
    model = CLIPTextModelWithProjection.from_pretrained(
        source,
        subfolder="text_encoder_2",
        revision=revision,
        dtype=dtype,
        variant=variant,
        attn_implementation="sdpa",
    )
    return XLClipSkipTextEncoderWithProjection(model.eval())


def _load_unet(
    source: str,
    revision: str | None,
    dtype: torch.dtype,
    variant: str | None = None,
    unet_source: str | None = None,
):
    if variant is None and unet_source is None:
        return XLUNet(_load_xl_unet(source, revision, dtype))
    unet = load_base_unet(source, revision, dtype, variant, unet_source)  # unet_name: a UNet of its own
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(
            f"{unet_source or source} has no SDXL UNet (addition_embed_type "
            f"{unet.config.addition_embed_type!r})"
        )
    return XLUNet(unet)


def _load_vae(source: str, revision: str | None, dtype: torch.dtype, variant: str | None = None):
    if variant is None:
        return _load_vae_decoder(source, revision, dtype)
    from diffusers import AutoencoderKL

    from ember.specs.sd15 import VaeDecoder

    vae = AutoencoderKL.from_pretrained(
        source, subfolder="vae", revision=revision, dtype=dtype, variant=variant
    )
    return VaeDecoder(vae.eval())


def _text_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        "sequence": TEXT_LENGTH,
        "hidden": config["hidden_size"],
        "projection": config.get("projection_dim", 0),
        "skips": CLIP_SKIPS,
    }


F32, I64 = torch.float32, torch.int64

TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    subfolder="text_encoder",
    version=1,
    inputs=(TensorSpec("input_ids", I64, ("batch", "sequence")),),
    outputs=(TensorSpec("hidden_states", F32, ("batch", "skips", "sequence", "hidden")),),
    load=_load_text_encoder,
    static_dims=_text_dims,
    image_dims=_image_dims,
    sample=_sample,
)

TEXT_ENCODER_2 = NetworkSpec(
    name="text_encoder_2",
    subfolder="text_encoder_2",
    version=1,
    inputs=(TensorSpec("input_ids", I64, ("batch", "sequence")),),
    outputs=(
        TensorSpec("hidden_states", F32, ("batch", "skips", "sequence", "hidden")),
        TensorSpec("text_embeds", F32, ("batch", "projection")),
    ),
    load=_load_text_encoder_2,
    static_dims=_text_dims,
    image_dims=_image_dims,
    sample=_sample,
)


def _xl_unet_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {**_unet_dims(config), "text_sequence": TEXT_LENGTH}  # dynamic; 77 (one window) by default


# ember.specs.sdxl's plain SDXL UNet with a dynamic text axis: encoder_hidden_states (B, 77 * windows, 2048)
# for long weighted prompts (ember.pipeline.prompt_weighting), traced at 2 windows and verified at 1 as
# SD1.5's (ember.specs.lora.UNET). A variant of its own: fal-ai/lcm's SDXL exports keep their fixed 77.
UNET = dataclasses.replace(
    SDXL_UNET,
    version=2,  # 2: the dynamic text_sequence axis
    inputs=tuple(
        TensorSpec(t.name, t.dtype, ("batch", "text_sequence", "hidden"))
        if t.name == "encoder_hidden_states"
        else t
        for t in SDXL_UNET.inputs
    ),
    static_dims=_xl_unet_dims,
    trace_dims=UNET_TRACE_DIMS,
    verify_dims=UNET_VERIFY_DIMS,
)

NETWORKS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER)


def bind_xl_loaders(
    variant: str | None, unet_source: str | None = None, vae_fp32: bool = False
) -> tuple[NetworkSpec, ...]:
    """(text_encoder, text_encoder_2, unet, vae_decoder) specs loading the base model's `variant` weights
    and custom UNet (`unet_source`, a diffusers UNet directory). `vae_fp32`: the VAE config sets
    force_upcast, so the decoder keeps float32 whatever EMBER_DTYPE / the engine precision says (diffusers
    upcasts it the same way; the original SDXL VAE overflows fp16)."""
    loaders = (
        functools.partial(_load_text_encoder, variant=variant),
        functools.partial(_load_text_encoder_2, variant=variant),
        functools.partial(_load_unet, variant=variant, unet_source=unet_source),
        functools.partial(_load_vae, variant=variant),
    )
    text, text_2, unet, vae = (
        dataclasses.replace(spec, load=load) for spec, load in zip(NETWORKS, loaders, strict=True)
    )
    return text, text_2, unet, dataclasses.replace(vae, engine_dtype=torch.float32 if vae_fp32 else None)
