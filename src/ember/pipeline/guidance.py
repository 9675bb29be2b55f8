"""Classifier-free guidance for epsilon-prediction UNets (Ho & Salimans 2022, diffusers' convention):
the UNet runs on [uncond; cond] in one batch, then noise = uncond + g (cond - uncond).

diffusers skips the unconditional half when g <= 1 (`do_classifier_free_guidance`), and so do we: that
changes the result only by the skipped arithmetic (at g = 1 the formula gives `cond` up to rounding).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ember.pipeline.encode import encode_prompts
from ember.runtime import Runner


def uses_cfg(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


def encode_with_negative(
    text_encoder: Runner,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    negative_prompt: str,
    guidance_scale: float,
    num_images: int = 1,
) -> torch.Tensor:
    """SD1.5 prompt embeddings in CFG order: (2k, 77, D) = [negative x k; prompt x k], or (k, 77, D) without
    CFG. An empty negative prompt is encoded as "" (diffusers' uncond_tokens), not zeros."""
    prompts = [negative_prompt, prompt] if uses_cfg(guidance_scale) else [prompt]
    return encode_prompts(text_encoder, tokenizer, prompts).repeat_interleave(num_images, dim=0)


def cfg_input(latents: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """(k, C, h, w) -> the UNet batch (2k, C, h, w) = [latents; latents] with CFG, else unchanged."""
    return torch.cat([latents, latents]) if uses_cfg(guidance_scale) else latents


def cfg_combine(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The UNet's (2k, ...) [uncond; cond] prediction -> guided (k, ...); without CFG unchanged."""
    if not uses_cfg(guidance_scale):
        return noise_pred
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
