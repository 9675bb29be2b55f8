"""The networks of Stable Cascade (Würstchen v3), as diffusers' StableCascadePriorPipeline and
StableCascadeDecoderPipeline call them: CLIP text encoder with projection, prior (stage C), decoder
(stage B), VQGAN decoder (stage A).

Sizes: stage C works on a latent of ceil(px / 42.67) per side (the prior pipeline's resolution_multiple),
stage B on int(stage C * 10.67) (the decoder pipeline's latent_dim_scale), and the VQGAN upsamples x4.
For sides that are multiples of 128 px this is exactly 3/128 and 32/128 of the pixels, and stage A gives
back the requested size; other sizes come out a few pixels off (576 px -> 596 px), so the pipeline only
accepts multiples of 128 and these specs size every tensor on that grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from torch import nn
from transformers import CLIPTextModelWithProjection

from ember.specs.base import NetworkSpec, TensorSpec, randn_sample

# The pipelines' own constants (StableCascadePriorPipeline.resolution_multiple, StableCascadeDecoderPipeline
# .latent_dim_scale); every released Stable Cascade / Würstchen v3 repo keeps these defaults.
RESOLUTION_MULTIPLE = 42.67
LATENT_DIM_SCALE = 10.67
VQGAN_SCALE = 4  # stage A: 2 levels of x2
SIZE_MULTIPLE = 128  # px; see the module docstring
TEXT_LENGTH = 77


def stage_sizes(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((stage C h, w), (stage B h, w)) for an image of height x width px, computed as diffusers does."""
    c = (math.ceil(height / RESOLUTION_MULTIPLE), math.ceil(width / RESOLUTION_MULTIPLE))
    b = (int(c[0] * LATENT_DIM_SCALE), int(c[1] * LATENT_DIM_SCALE))
    return c, b


class CascadeTextEncoder(nn.Module):
    """input_ids, attention_mask (B, 77) int64 -> (B, 77, D) last hidden states (before the final layer
    norm: diffusers' hidden_states[-1]) and (B, 1, P) projected pooled embedding (text_embeds)."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1], out.text_embeds.unsqueeze(1)


class CascadePrior(nn.Module):
    """Stage C: one prediction of the image embedding. Text-to-image conditions on no image: the CLIP image
    embedding is zeros (B, 1, clip_image_in_channels), as StableCascadePriorPipeline passes without images."""

    def __init__(self, prior: StableCascadeUNet):
        super().__init__()
        self.prior = prior
        self.config = dict(prior.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 16, hc, wc)
        timestep_ratio: torch.Tensor,  # (B,) in [0, 1]
        clip_text_pooled: torch.Tensor,  # (B, 1, P)
        clip_text: torch.Tensor,  # (B, 77, D)
    ) -> torch.Tensor:
        clip_img = sample.new_zeros(sample.shape[0], 1, self.config["clip_image_in_channels"])
        return self.prior(
            sample=sample,
            timestep_ratio=timestep_ratio,
            clip_text_pooled=clip_text_pooled,
            clip_text=clip_text,
            clip_img=clip_img,
            return_dict=False,
        )[0]


class CascadeDecoder(nn.Module):
    """Stage B: one prediction of the VQGAN latent, conditioned on stage C's output (effnet) and pooled text."""

    def __init__(self, decoder: StableCascadeUNet):
        super().__init__()
        self.decoder = decoder
        self.config = dict(decoder.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, hb, wb)
        timestep_ratio: torch.Tensor,  # (B,)
        clip_text_pooled: torch.Tensor,  # (B, 1, P)
        effnet: torch.Tensor,  # (B, 16, hc, wc)
    ) -> torch.Tensor:
        return self.decoder(
            sample=sample,
            timestep_ratio=timestep_ratio,
            clip_text_pooled=clip_text_pooled,
            effnet=effnet,
            return_dict=False,
        )[0]


class VqganDecoder(nn.Module):
    """Stage A: latent (B, 4, hb, wb), already multiplied by the VQGAN's scale_factor -> (B, 3, 4hb, 4wb)
    in about [0, 1] (unclamped; no quantization, as diffusers decodes)."""

    def __init__(self, vqgan: PaellaVQModel):
        super().__init__()
        self.vqgan = vqgan
        self.config = dict(vqgan.config)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(latent, return_dict=False)[0]


def _load_text_encoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    model = CLIPTextModelWithProjection.from_pretrained(
        source, subfolder="text_encoder", revision=revision, dtype=dtype, attn_implementation="sdpa"
    )
    return CascadeTextEncoder(model.eval())


def _load_prior(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    prior = StableCascadeUNet.from_pretrained(source, subfolder="prior", revision=revision, dtype=dtype)
    if prior.config.clip_text_in_channels is None:
        raise ValueError(
            f"{source}/prior is not a Stable Cascade prior: its config has no clip_text_in_channels"
        )
    return CascadePrior(prior.eval())


def _load_decoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    decoder = StableCascadeUNet.from_pretrained(source, subfolder="decoder", revision=revision, dtype=dtype)
    if decoder.config.effnet_in_channels is None:
        raise ValueError(
            f"{source}/decoder is not a Stable Cascade decoder: its config has no effnet_in_channels"
        )
    return CascadeDecoder(decoder.eval())


def _load_vqgan(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    vqgan = PaellaVQModel.from_pretrained(source, subfolder="vqgan", revision=revision, dtype=dtype)
    return VqganDecoder(vqgan.eval())


def _image_dims(batch: int, height: int, width: int) -> dict[str, int]:
    """Dynamic sizes for height x width px, rounded up to the 128 px grid the pipeline runs on."""
    height = -(-height // SIZE_MULTIPLE) * SIZE_MULTIPLE
    width = -(-width // SIZE_MULTIPLE) * SIZE_MULTIPLE
    (hc, wc), (hb, wb) = stage_sizes(height, width)
    return {
        "batch": batch,
        "embed_height": hc,
        "embed_width": wc,
        "latent_height": hb,
        "latent_width": wb,
        "image_height": hb * VQGAN_SCALE,
        "image_width": wb * VQGAN_SCALE,
    }


def _sample(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if spec.name == "input_ids":
        return torch.randint(0, 49406, shape, generator=generator, dtype=spec.dtype)
    if spec.name == "attention_mask":
        # A prompt of random length, then padding: ones then zeros per row, as the tokenizer gives.
        lengths = torch.randint(2, shape[1] + 1, (shape[0], 1), generator=generator)
        return (torch.arange(shape[1])[None, :] < lengths).to(spec.dtype)
    if spec.name == "timestep_ratio":
        return torch.rand(shape, generator=generator, dtype=spec.dtype)
    return randn_sample(spec, shape, generator)


def _text_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        "sequence": TEXT_LENGTH,
        "one": 1,
        "hidden": config["hidden_size"],
        "projection": config["projection_dim"],
    }


def _prior_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        "embed_channels": config["in_channels"],
        "sequence": TEXT_LENGTH,
        "one": 1,
        "hidden": config["clip_text_in_channels"],
        "projection": config["clip_text_pooled_in_channels"],
    }


def _decoder_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        "latent_channels": config["in_channels"],
        "embed_channels": config["effnet_in_channels"],
        "one": 1,
        "projection": config["clip_text_pooled_in_channels"],
    }


def _vqgan_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {"latent_channels": config["latent_channels"], "rgb": config["out_channels"]}


F32, I64 = torch.float32, torch.int64
EMBED = ("batch", "embed_channels", "embed_height", "embed_width")
LATENT = ("batch", "latent_channels", "latent_height", "latent_width")
# Traced at stage C 9 x 6 / stage B 96 x 64, verified at 6 x 15 / 64 x 160 and another batch size.
TRACE_SHAPE = (2, 384, 256)
VERIFY_SHAPE = (1, 256, 640)

TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    subfolder="text_encoder",
    version=1,
    inputs=(
        TensorSpec("input_ids", I64, ("batch", "sequence")),
        TensorSpec("attention_mask", I64, ("batch", "sequence")),
    ),
    outputs=(
        TensorSpec("text_embeddings", F32, ("batch", "sequence", "hidden")),
        TensorSpec("text_embeds_pooled", F32, ("batch", "one", "projection")),
    ),
    load=_load_text_encoder,
    static_dims=_text_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_shape=TRACE_SHAPE,
    verify_shape=VERIFY_SHAPE,
)

PRIOR = NetworkSpec(
    name="prior",
    subfolder="prior",
    version=1,
    inputs=(
        TensorSpec("sample", F32, EMBED),
        TensorSpec("timestep_ratio", F32, ("batch",)),
        TensorSpec("clip_text_pooled", F32, ("batch", "one", "projection")),
        TensorSpec("clip_text", F32, ("batch", "sequence", "hidden")),
    ),
    outputs=(TensorSpec("predicted", F32, EMBED),),
    load=_load_prior,
    static_dims=_prior_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_shape=TRACE_SHAPE,
    verify_shape=VERIFY_SHAPE,
)

DECODER = NetworkSpec(
    name="decoder",
    subfolder="decoder",
    version=1,
    inputs=(
        TensorSpec("sample", F32, LATENT),
        TensorSpec("timestep_ratio", F32, ("batch",)),
        TensorSpec("clip_text_pooled", F32, ("batch", "one", "projection")),
        TensorSpec("effnet", F32, EMBED),
    ),
    outputs=(TensorSpec("predicted", F32, LATENT),),
    load=_load_decoder,
    static_dims=_decoder_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_shape=TRACE_SHAPE,
    verify_shape=VERIFY_SHAPE,
)

VQGAN_DECODER = NetworkSpec(
    name="vqgan_decoder",
    subfolder="vqgan",
    version=1,
    inputs=(TensorSpec("latent", F32, LATENT),),
    outputs=(TensorSpec("images", F32, ("batch", "rgb", "image_height", "image_width")),),
    load=_load_vqgan,
    static_dims=_vqgan_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_shape=TRACE_SHAPE,
    verify_shape=VERIFY_SHAPE,
)

STABLE_CASCADE_NETWORKS = (TEXT_ENCODER, PRIOR, DECODER, VQGAN_DECODER)
