"""The networks of an arbitrary Stable Diffusion 1.5 base model as fal-ai/lora runs it: a CLIP text
encoder exposing the hidden states `clip_skip` picks from, a plain (non-LCM) UNet called with
classifier-free guidance, and the VAE decoder of ember.specs.sd15.

The base model is named per request (HF id or local directory), so `load` is bound to the request's
`variant` and custom `unet_name` with `bind_loaders` rather than fixed at import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.sd15 import TEXT_LENGTH, VAE_DECODER, _image_dims, _load_vae_decoder, _sample, _text_dims

# clip_skip in 0..2 (fal's range): the text encoder returns one embedding per value.
CLIP_SKIPS = 3


class ClipSkipTextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> (B, 3, 77, D): for clip_skip = 0, 1, 2 the hidden state of the last,
    second-to-last and third-to-last layer, each through the final layer norm, as diffusers'
    StableDiffusionPipeline.encode_prompt computes it (skip 0 is exactly `last_hidden_state`)."""

    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it.
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        skipped = [norm(out.hidden_states[-(skip + 1)]) for skip in range(1, CLIP_SKIPS)]
        return torch.stack([out.last_hidden_state, *skipped], dim=1)


class SdUNet(nn.Module):
    """One denoiser call: sample (B, 4, h, w), timestep (B,) float, encoder_hidden_states (B, 77 * w, D): one
    77-token window, or w of them for a long weighted prompt (ember.pipeline.prompt_weighting)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.config = dict(unet.config)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _load_text_encoder(
    source: str, revision: str | None, dtype: torch.dtype, variant: str | None = None
) -> nn.Module:
    model = CLIPTextModel.from_pretrained(
        source,
        subfolder="text_encoder",
        revision=revision,
        dtype=dtype,
        variant=variant,
        attn_implementation="sdpa",
    )
    return ClipSkipTextEncoder(model.eval())


def load_base_unet(
    source: str, revision: str | None, dtype: torch.dtype, variant: str | None, unet_source: str | None
) -> UNet2DConditionModel:
    """The base model's UNet (`source`/unet), or `unet_source`: a custom UNet (unet_name), a repo/directory
    holding the UNet itself (config.json at its root). SD1.5 and SDXL bases alike."""
    if unet_source:
        unet = UNet2DConditionModel.from_pretrained(unet_source, dtype=dtype, variant=variant)
    else:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", revision=revision, dtype=dtype, variant=variant
        )
    return unet.eval()


def _load_unet(
    source: str,
    revision: str | None,
    dtype: torch.dtype,
    variant: str | None = None,
    unet_source: str | None = None,
) -> nn.Module:
    return SdUNet(load_base_unet(source, revision, dtype, variant, unet_source))


def _text_skip_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {**_text_dims(config), "skips": CLIP_SKIPS}


def _unet_dims(config: Mapping[str, Any]) -> dict[str, int]:
    # text_sequence is dynamic (see UNET_TRACE_DIMS); 77, one window, is its size in samples and warm-ups.
    return {
        "latent_channels": config["in_channels"],
        "sequence": TEXT_LENGTH,
        "text_sequence": TEXT_LENGTH,
        "hidden": config["cross_attention_dim"],
    }


# The UNet's text axis ("text_sequence", dynamic) is traced at 2 windows and verified at 1, so a window
# count baked into the graph fails the export. compel's windows are 77 tokens, so any multiple runs; at most
# ember.pipeline.prompt_weighting.MAX_WINDOWS (8) are served. SDXL bases' UNet too (ember.specs.lora_xl).
UNET_TRACE_DIMS = {"text_sequence": 2 * TEXT_LENGTH}
UNET_VERIFY_DIMS = {"text_sequence": TEXT_LENGTH}


F32, I64 = torch.float32, torch.int64

TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    subfolder="text_encoder",
    version=1,
    inputs=(TensorSpec("input_ids", I64, ("batch", "sequence")),),
    outputs=(TensorSpec("hidden_states", F32, ("batch", "skips", "sequence", "hidden")),),
    load=_load_text_encoder,
    static_dims=_text_skip_dims,
    image_dims=_image_dims,
    sample=_sample,
)

UNET = NetworkSpec(
    name="unet",
    subfolder="unet",
    version=2,  # 2: encoder_hidden_states takes 77 * windows tokens (long weighted prompts), not 77
    inputs=(
        TensorSpec("sample", F32, ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", F32, ("batch",)),
        TensorSpec("encoder_hidden_states", F32, ("batch", "text_sequence", "hidden")),
    ),
    outputs=(TensorSpec("noise_pred", F32, ("batch", "latent_channels", "latent_height", "latent_width")),),
    load=_load_unet,
    static_dims=_unet_dims,
    image_dims=_image_dims,
    sample=_sample,
    trace_dims=UNET_TRACE_DIMS,
    verify_dims=UNET_VERIFY_DIMS,
)

SD15_LORA_NETWORKS = (TEXT_ENCODER, UNET, VAE_DECODER)


def bind_loaders(variant: str | None, unet_source: str | None) -> tuple[NetworkSpec, ...]:
    """The three specs with `load` bound to a request's HF `variant` and custom U-Net."""

    def text(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
        return _load_text_encoder(source, revision, dtype, variant)

    def unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
        return _load_unet(source, revision, dtype, variant, unet_source)

    def vae(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
        if variant is None:
            return _load_vae_decoder(source, revision, dtype)
        from diffusers import AutoencoderKL

        from ember.specs.sd15 import VaeDecoder

        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", revision=revision, dtype=dtype, variant=variant
        )
        return VaeDecoder(vae.eval())

    return (
        dataclasses.replace(TEXT_ENCODER, load=text),
        dataclasses.replace(UNET, load=unet),
        dataclasses.replace(VAE_DECODER, load=vae),
    )
