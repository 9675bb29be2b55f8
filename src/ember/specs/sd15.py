"""The networks of a Stable Diffusion 1.5 pipeline with an LCM UNet: CLIP text encoder, UNet, VAE decoder.

Each is wrapped in a small nn.Module whose forward takes the spec's inputs by name and returns its output,
so the exporter, the torch runtime and the tests all run exactly the same graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel

from ember.specs.base import NetworkSpec, TensorSpec, randn_sample

# SD's VAE halves the resolution 3 times (4 blocks): 512 px images <-> 64 px latents.
LATENT_SCALE = 8
# CLIP's context length: prompts are padded / truncated to 77 tokens.
TEXT_LENGTH = 77


class ClipTextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> last hidden state (B, 77, D): what SD conditions on (no pooling, no skip)."""

    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class LcmUNet(nn.Module):
    """One LCM denoiser call. timestep is float (B,) so one batch may mix steps; timestep_cond is the
    guidance-scale embedding (B, time_cond_proj_dim) that replaces classifier-free guidance in LCM."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.config = dict(unet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, D)
        timestep_cond: torch.Tensor,  # (B, time_cond_proj_dim)
    ) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False
        )[0]


class VaeDecoder(nn.Module):
    """latent (B, 4, h, w), already divided by the VAE scaling factor -> image (B, 3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.config = dict(vae.config)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> the latent distribution's mean and std (B, 4, H/8, W/8), unscaled.

    The sample is drawn outside (mean + std * noise from the request's generator), as diffusers'
    `retrieve_latents(vae.encode(image), generator)` does, so a seed gives diffusers' latents.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.config = dict(vae.config)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images, return_dict=False)[0]
        return dist.mean, dist.std


def _load_text_encoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    model = CLIPTextModel.from_pretrained(
        source, subfolder="text_encoder", revision=revision, dtype=dtype, attn_implementation="sdpa"
    )
    return ClipTextEncoder(model.eval())


def _load_unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype)
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(f"{source} has no LCM UNet: unet/config.json sets no time_cond_proj_dim")
    return LcmUNet(unet.eval())


def _load_vae_decoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, dtype=dtype)
    return VaeDecoder(vae.eval())


def _load_vae_encoder(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, dtype=dtype)
    return VaeEncoder(vae.eval())


def _image_dims(batch: int, height: int, width: int) -> dict[str, int]:
    return {
        "batch": batch,
        "latent_height": height // LATENT_SCALE,
        "latent_width": width // LATENT_SCALE,
        "image_height": height,
        "image_width": width,
    }


def _sample(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if spec.name == "input_ids":
        # Any ids below <|startoftext|> (49406) are valid for every CLIP vocabulary.
        return torch.randint(0, 49406, shape, generator=generator, dtype=spec.dtype)
    if spec.name == "timestep":
        return torch.randint(0, 1000, shape, generator=generator).to(spec.dtype)
    return randn_sample(spec, shape, generator)


def _text_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {"sequence": TEXT_LENGTH, "hidden": config["hidden_size"]}


def _unet_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        "latent_channels": config["in_channels"],
        "sequence": TEXT_LENGTH,
        "hidden": config["cross_attention_dim"],
        "time_cond": config["time_cond_proj_dim"],
    }


def _vae_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {"latent_channels": config["latent_channels"], "rgb": config["out_channels"]}


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

UNET = NetworkSpec(
    name="unet",
    subfolder="unet",
    version=1,
    inputs=(
        TensorSpec("sample", F32, ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", F32, ("batch",)),
        TensorSpec("encoder_hidden_states", F32, ("batch", "sequence", "hidden")),
        TensorSpec("timestep_cond", F32, ("batch", "time_cond")),
    ),
    outputs=(TensorSpec("noise_pred", F32, ("batch", "latent_channels", "latent_height", "latent_width")),),
    load=_load_unet,
    static_dims=_unet_dims,
    image_dims=_image_dims,
    sample=_sample,
)

VAE_DECODER = NetworkSpec(
    name="vae_decoder",
    subfolder="vae",
    version=1,
    inputs=(TensorSpec("latent", F32, ("batch", "latent_channels", "latent_height", "latent_width")),),
    outputs=(TensorSpec("images", F32, ("batch", "rgb", "image_height", "image_width")),),
    load=_load_vae_decoder,
    static_dims=_vae_dims,
    image_dims=_image_dims,
    sample=_sample,
)

VAE_ENCODER = NetworkSpec(
    name="vae_encoder",
    subfolder="vae",
    version=1,
    inputs=(TensorSpec("images", F32, ("batch", "rgb", "image_height", "image_width")),),
    outputs=(
        TensorSpec("latent_mean", F32, ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("latent_std", F32, ("batch", "latent_channels", "latent_height", "latent_width")),
    ),
    load=_load_vae_encoder,
    static_dims=_vae_dims,
    image_dims=_image_dims,
    sample=_sample,
)

# In the order they run; the VAE encoder only for image-to-image and inpainting.
SD15_LCM_NETWORKS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
