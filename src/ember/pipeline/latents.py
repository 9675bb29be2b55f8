"""What the denoising loop starts from: initial noise and the LCM guidance embedding."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def initial_latents(
    generator: torch.Generator,
    num_images: int,
    channels: int,
    height: int,
    width: int,
    init_noise_sigma: float,
) -> torch.Tensor:
    """(num_images, C, h, w) noise drawn from the request's own CPU generator in one call, as diffusers'
    prepare_latents does with one generator, then scaled by the scheduler's init_noise_sigma."""
    noise = randn_tensor((num_images, channels, height, width), generator=generator, dtype=torch.float32)
    return noise * init_noise_sigma


def guidance_embedding(guidance_scale: float, num_images: int, dim: int) -> torch.Tensor:
    """(num_images, dim) sinusoidal embedding of w = guidance_scale - 1, the LCM UNet's timestep_cond.

    LCM distils classifier-free guidance into the UNet (w enters like a second timestep), so there is
    no unconditional pass. diffusers uses the Imagen CFG convention and subtracts 1 from guidance_scale;
    the embedding is VDM's (google-research/vdm model_vdm.py), with w scaled by 1000 like a timestep.
    """
    w = torch.tensor(guidance_scale - 1).repeat(num_images) * 1000.0  # (N,) float32
    half = dim // 2
    # log(10000) as a float32 tensor, as diffusers computes it, so the embedding matches bit for bit.
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1))
    )
    angles = w[:, None] * freqs[None, :]  # (N, dim/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb
