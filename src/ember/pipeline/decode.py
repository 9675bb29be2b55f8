"""Latents to pixels: the VAE decoder network, then [-1, 1] floats to uint8 RGB."""

from __future__ import annotations

import torch

from ember.runtime import Runner


def decode_latents(vae_decoder: Runner, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """(N, 4, h, w) denoised latents -> (N, 3, 8h, 8w) images in about [-1, 1]."""
    return vae_decoder.run({"latent": latents / scaling_factor})["images"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, with the same float ops as diffusers' image processor
    (denormalize, clamp, * 255, round), so equal floats give equal pixels."""
    images = (images.float().cpu() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in about [0, 1] (decoders with no [-1, 1] convention, e.g. Stable Cascade's VQGAN)
    -> (N, H, W, 3) uint8: clamp, * 255, round, as diffusers' pipelines and numpy_to_pil do."""
    images = images.float().cpu().clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
