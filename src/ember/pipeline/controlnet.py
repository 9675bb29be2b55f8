"""ControlNet conditioning per denoising step, as diffusers' StableDiffusionControlNetPipeline (and its
Multi-ControlNet) computes it: each unit's residuals, scaled by `conditioning_scale` while the step lies
within [control_guidance_start, control_guidance_end] of the schedule (0 outside), summed over units and
added to the UNet's skip connections (the UNet of ember.specs.controlnet takes them as inputs).

Units are per request, so a batch may mix requests with different ControlNets, images and scales: each
ControlNet network runs once per step on the rows that use it, and rows it does not condition get zeros.

A unit may carry a mask (fal-ai/lora's `controlnets[].mask_url`): its residuals are then confined to the
mask's region. Each residual lives on a latent grid (latent / 1, 2, 4, 8); the mask, resized to the output
size, is area-averaged onto that grid (adaptive average pooling) and multiplies the residual, so a cell
counts with the fraction of its pixels the mask covers (white = 1 = full control, black = 0 = none).

A unit may carry its own cross-attention tokens (fal-ai/lora's `controlnets[].ip_adapter_index`: InstantID's
IdentityNet reads an IP-Adapter's projected face tokens, not the prompt): the ControlNet then gets those
rows as encoder_hidden_states instead of the prompt embeddings (ember.pipeline.instantid).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ember.runtime import Runner
from ember.specs.controlnet import RESIDUAL_NAMES, _grid_dims, residual_layout


def control_image(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, height, width) float32 in [0, 1], resized as diffusers' control image
    processor does it (PIL Lanczos to the output size, no normalisation to [-1, 1])."""
    resized = Image.fromarray(image).convert("RGB").resize((width, height), resample=Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized).astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def control_mask(mask: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(H, W) uint8 grey (white = apply) -> (1, 1, height, width) float32 in [0, 1], resized to the output
    size with the same Lanczos filter as its control image (fal: the mask has the control image's size)."""
    resized = Image.fromarray(mask).convert("L").resize((width, height), resample=Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized).astype(np.float32) / 255.0)[None, None]


def masked(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, c, h_l, w_l) residual x the (1, 1, H, W) mask area-averaged onto its (h_l, w_l) grid."""
    return residual * F.adaptive_avg_pool2d(mask.to(residual.device, residual.dtype), residual.shape[-2:])


def control_active(step: int, total: int, start: float, end: float) -> bool:
    """Whether step `step` (0-based) of `total` lies in [start, end] as fractions of the schedule: diffusers'
    `controlnet_keep`, 1 - (i / n < start or (i + 1) / n > end)."""
    return not (step / total < start or (step + 1) / total > end)


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet conditioning one request (k images)."""

    runner: Runner  # the ControlNet network (ember.specs.controlnet.CONTROLNET)
    # (1, 3, H, W) in [0, 1] (control_image), already at the output size; the inpaint ControlNet's has -1
    # at the pixels to fill (ember.pipeline.lcm_controlnet.inpaint_condition)
    image: torch.Tensor
    scale: float = 1.0  # controlnet_conditioning_scale
    start: float = 0.0  # control_guidance_start, fraction of the schedule
    end: float = 1.0  # control_guidance_end
    # diffusers' guess mode: the ControlNet sees only the conditional half of a CFG batch (the
    # unconditional rows get zeros), and its residuals are weighted 0.1 .. 1 from shallow to deep.
    guess_mode: bool = False
    mask: torch.Tensor | None = None  # (1, 1, H, W) in [0, 1] (control_mask): confines the residuals
    # The ControlNet's config sets global_pool_conditions (shuffle-like ControlNets): its residuals come
    # pooled to 1 x 1 (added to every position) and guess mode does not weight them, as in diffusers.
    pooled: bool = False
    # The ControlNet's encoder_hidden_states for the request's rows ([uncond x k; cond x k] with CFG),
    # (rows, T, D), instead of the prompt embeddings: an IP-Adapter's projected image tokens (InstantID).
    tokens: torch.Tensor | None = None


@dataclass(frozen=True)
class ControlRows:
    """Where a request's units act in one step's UNet batch: rows [offset, offset + size), of which the
    last `k` are the conditional half (all of them without CFG)."""

    units: Sequence[ControlNetUnit]
    offset: int
    size: int
    k: int


# (config) -> (channels, level) per residual: SD1.5's residual_layout, SDXL's xl_residual_layout.
Layout = Callable[[Mapping[str, Any]], list[tuple[int, int]]]


def zero_residuals(
    unet_config: Mapping[str, Any],
    batch: int,
    latent_h: int,
    latent_w: int,
    like: torch.Tensor,
    names: Sequence[str] = RESIDUAL_NAMES,
    layout: Layout = residual_layout,
) -> dict[str, torch.Tensor]:
    """Residual inputs that leave the controlled UNet equal to the plain one (x + 0 = x); `names` and
    `layout` are the controlled UNet's (SD1.5's by default, ember.specs.controlnet_xl for SDXL)."""
    dims = _grid_dims(batch, latent_h * 8, latent_w * 8)
    out = {}
    for name, (channels, level) in zip(names, layout(unet_config), strict=True):
        suffix = "" if level == 0 else f"_{2**level}"
        shape = (batch, channels, dims[f"latent_height{suffix}"], dims[f"latent_width{suffix}"])
        out[name] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return out


# One unit's share of a ControlNet call: (rows index (n,), control image (n, 3, H, W), scale (n,), mask,
# its own encoder_hidden_states (n, T, D) or None for the prompt embeddings' rows).
_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


def controlnet_residuals(
    rows: Sequence[ControlRows],
    sample: torch.Tensor,  # (B, C, h, w): the UNet's input this step, scheduler-scaled
    timestep: torch.Tensor,  # (B,)
    embeddings: torch.Tensor,  # (B, 77, D)
    step: int,
    total: int,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor] | None:
    """The summed residuals of every unit for the whole batch (the ControlNets' output names, batch B), or
    None when no row has a unit. A unit outside its start/end runs with scale 0, as diffusers runs it.
    `extra`: more ControlNet inputs with rows as `embeddings` (SDXL's text_embeds (B, P), time_ids (B, 6)):
    each ControlNet gets the rows it conditions, as the UNet gets them."""
    # One call per (runner, guess mode, pooled, own tokens' shape); each part is one unit's rows.
    calls: dict[tuple[int, bool, bool, tuple[int, ...] | None], tuple[Runner, list[_Part]]] = {}
    for r in rows:
        for unit in r.units:
            scale = unit.scale if control_active(step, total, unit.start, unit.end) else 0.0
            first = r.offset + (r.size - r.k if unit.guess_mode else 0)
            index = torch.arange(first, r.offset + r.size)  # the rows this unit conditions
            image = unit.image.to(sample.device).expand(len(index), -1, -1, -1)
            # its own tokens' rows (guess mode: the conditional ones), else the prompt embeddings'
            tokens = None if unit.tokens is None else unit.tokens[first - r.offset :].to(sample.device)
            shape = None if tokens is None else tuple(tokens.shape[1:])
            # Units sharing a runner and a guess mode run as one call; each keeps its own rows.
            key = (id(unit.runner), unit.guess_mode, unit.pooled, shape)
            calls.setdefault(key, (unit.runner, []))[1].append(
                (index, image, torch.full((len(index),), scale), unit.mask, tokens)
            )
    if not calls:
        return None
    total_residuals: dict[str, torch.Tensor] = {}
    for (_, guess_mode, pooled, shape), (runner, parts) in calls.items():
        index = torch.cat([p[0] for p in parts])
        # the key's shape: every part has its own tokens (InstantID) or none does
        states = embeddings[index] if shape is None else torch.cat([p[4] for p in parts])
        out = runner.run(
            {
                "sample": sample[index],
                "timestep": timestep[index],
                "encoder_hidden_states": states,
                "controlnet_cond": torch.cat([p[1] for p in parts]),
                "conditioning_scale": torch.cat([p[2] for p in parts]),
                **{name: value[index] for name, value in (extra or {}).items()},
            }
        )
        # Guess mode weights residual j of n by 10^(-1 + j / (n - 1)), shallow to deep (diffusers'
        # torch.logspace over the down residuals and the mid one: n = 13 for SD1.5, 10 for SDXL); not the
        # pooled residuals of a global_pool_conditions ControlNet (diffusers' ControlNetModel skips them).
        weights = torch.logspace(-1, 0, len(out)) if guess_mode and not pooled else None
        for j, name in enumerate(out):
            value = out[name] if weights is None else out[name] * weights[j]
            if any(p[3] is not None for p in parts):  # masks apply to their own unit's rows only
                pieces = value.split([len(p[0]) for p in parts])
                value = torch.cat([v if p[3] is None else masked(v, p[3]) for v, p in zip(pieces, parts)])
            total = total_residuals.get(name)
            if total is None:
                total = torch.zeros((sample.shape[0], *value.shape[1:]), dtype=value.dtype, device=value.device)
            elif total.shape[1:] != value.shape[1:]:  # pooled (1 x 1) and spatial units: broadcast, as the
                full = torch.broadcast_shapes(total.shape[1:], value.shape[1:])  # UNet's add would
                total = total.expand(total.shape[0], *full).clone()
                value = value.expand(value.shape[0], *full)
            total_residuals[name] = total.index_add_(0, index.to(value.device), value)
    return total_residuals
