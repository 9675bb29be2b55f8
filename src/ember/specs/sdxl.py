"""The networks of a Stable Diffusion XL pipeline: two CLIP text encoders, the UNet, the VAE.

SDXL conditions on both text encoders' penultimate hidden states, concatenated along the feature axis
((B, 77, 768) + (B, 77, 1280) -> (B, 77, 2048)), plus "added conditions": the second encoder's projected
pooled embedding `text_embeds` (B, 1280) and six micro-conditioning numbers `time_ids` (B, 6): original
size, crop top-left, target size (ember.pipeline.sdxl builds them). An LCM-distilled UNet
(latent-consistency/lcm-sdxl) also takes the guidance embedding `timestep_cond` (B, time_cond_proj_dim).

The VAE is SDXL's with its fp16-stable weights (madebyollin/sdxl-vae-fp16-fix: same architecture and
latents, activations scaled to stay finite in half precision), so no network here pins fp32; the original
SDXL VAE overflows fp16 and would need `engine_dtype=torch.float32` on the VAE specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.sd15 import TEXT_LENGTH, VAE_DECODER, VAE_ENCODER, _image_dims, _sample

# SDXL's micro-conditioning: (original h, w, crop top, crop left, target h, w). The refiner's variant has
# 5 (an aesthetic score instead of the target size); the UNet config says which (ember.pipeline.sdxl).
TIME_IDS = 6


class XLTextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> penultimate hidden states (B, 77, D) of CLIPTextModel: what SDXL's
    first encoder contributes (diffusers' encode_prompt with clip_skip=None: hidden_states[-2]).
    No attention mask, as diffusers calls it: causal attention keeps padding out of the real tokens."""

    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class XLTextEncoderWithProjection(nn.Module):
    """input_ids (B, 77) int64 -> penultimate hidden states (B, 77, D2) and the projected pooled embedding
    text_embeds (B, P) of CLIPTextModelWithProjection (SDXL's second encoder; P = projection_dim)."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class XLUNet(nn.Module):
    """One SDXL denoiser call with the "text_time" added conditions; timestep is float (B,) so one batch
    may mix steps (requests at different points of their schedules)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.config = dict(unet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, 2048)
        text_embeds: torch.Tensor,  # (B, 1280)
        time_ids: torch.Tensor,  # (B, 6)
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[
            0
        ]


class XLLcmUNet(XLUNet):
    """XLUNet plus timestep_cond (B, time_cond_proj_dim): LCM's guidance-scale embedding, which replaces
    classifier-free guidance (diffusers' XL pipelines pass it and skip CFG when the UNet has
    time_cond_proj_dim)."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        timestep_cond: torch.Tensor,  # (B, time_cond_proj_dim)
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


def _load_text_encoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    model = CLIPTextModel.from_pretrained(
        source, subfolder="text_encoder", revision=revision, dtype=dtype, attn_implementation="sdpa"
    )
    return XLTextEncoder(model.eval())


def _load_text_encoder_2(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    model = CLIPTextModelWithProjection.from_pretrained(
        source, subfolder="text_encoder_2", revision=revision, dtype=dtype, attn_implementation="sdpa"
    )
    return XLTextEncoderWithProjection(model.eval())


def _load_xl_unet(source: str, revision: str | None, dtype: torch.dtype) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype)
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(
            f"{source} has no SDXL UNet: unet/config.json sets addition_embed_type="
            f"{unet.config.addition_embed_type!r}, not 'text_time'"
        )
    return unet.eval()


def _load_unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    return XLUNet(_load_xl_unet(source, revision, dtype))


def _load_lcm_unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    unet = _load_xl_unet(source, revision, dtype)
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(
            f"{source} has no LCM UNet: unet/config.json sets no time_cond_proj_dim (models.toml: point "
            "the `unet` component at an LCM-distilled UNet, e.g. latent-consistency/lcm-sdxl)"
        )
    return XLLcmUNet(unet)


def _text_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {"sequence": TEXT_LENGTH, "hidden": config["hidden_size"], "projection": config["projection_dim"]}


def _unet_dims(config: Mapping[str, Any]) -> dict[str, int]:
    # projection_class_embeddings_input_dim = TIME_IDS x addition_time_embed_dim + the pooled width
    pooled = config["projection_class_embeddings_input_dim"] - TIME_IDS * config["addition_time_embed_dim"]
    return {
        "latent_channels": config["in_channels"],
        "sequence": TEXT_LENGTH,
        "hidden": config["cross_attention_dim"],
        "pooled": pooled,
        "time_ids": TIME_IDS,
        "time_cond": config["time_cond_proj_dim"] or 0,
    }


F32, I64 = torch.float32, torch.int64

TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    subfolder="text_encoder",
    version=1,
    inputs=(TensorSpec("input_ids", I64, ("batch", "sequence")),),
    outputs=(TensorSpec("text_embeddings", F32, ("batch", "sequence", "hidden")),),
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
        TensorSpec("text_embeddings", F32, ("batch", "sequence", "hidden")),
        TensorSpec("text_embeds", F32, ("batch", "projection")),
    ),
    load=_load_text_encoder_2,
    static_dims=_text_dims,
    image_dims=_image_dims,
    sample=_sample,
)

_UNET_INPUTS = (
    TensorSpec("sample", F32, ("batch", "latent_channels", "latent_height", "latent_width")),
    TensorSpec("timestep", F32, ("batch",)),
    TensorSpec("encoder_hidden_states", F32, ("batch", "sequence", "hidden")),
    TensorSpec("text_embeds", F32, ("batch", "pooled")),
    TensorSpec("time_ids", F32, ("batch", "time_ids")),
)
_NOISE_PRED = (TensorSpec("noise_pred", F32, ("batch", "latent_channels", "latent_height", "latent_width")),)

# A plain SDXL UNet (base models with classifier-free guidance: fal-ai/lora's SDXL bases).
UNET = NetworkSpec(
    name="unet",
    subfolder="unet",
    version=1,
    inputs=_UNET_INPUTS,
    outputs=_NOISE_PRED,
    load=_load_unet,
    static_dims=_unet_dims,
    image_dims=_image_dims,
    sample=_sample,
)

LCM_UNET = NetworkSpec(
    name="unet",
    subfolder="unet",
    version=1,
    inputs=(*_UNET_INPUTS, TensorSpec("timestep_cond", F32, ("batch", "time_cond"))),
    outputs=_NOISE_PRED,
    load=_load_lcm_unet,
    static_dims=_unet_dims,
    image_dims=_image_dims,
    sample=_sample,
)

# SDXL's VAE has SD1.5's architecture (4 blocks, 4 latent channels; its own scaling_factor 0.13025 comes
# from the config), so the SD1.5 wrappers and specs serve it unchanged.
# In the order they run; the VAE encoder only for image-to-image and inpainting.
SDXL_LCM_NETWORKS = (TEXT_ENCODER, TEXT_ENCODER_2, LCM_UNET, VAE_DECODER, VAE_ENCODER)
SDXL_NETWORKS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER)
