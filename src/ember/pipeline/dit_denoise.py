"""Denoising a DiT with classifier-free guidance, shared by every request in a batch: one transformer call
per step for all of them.

Each request keeps its own scheduler and generator (SA-Solver draws noise every step), its own guidance
scale, and its own text conditioning with its attention mask, so batching changes no request's maths: the
transformer is per-sample (layer norms and attention within a sample), guidance and the scheduler step run
per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin

from ember.pipeline.guidance import cfg_combine, cfg_input, uses_cfg
from ember.pipeline.requests import StepCallback
from ember.runtime import Runner


@dataclass
class GuidedSlot:
    """One request's share of a batched, guided denoising run. k = the request's num_images."""

    index: int  # the request's position in the list given to the pipeline (for callbacks)
    scheduler: SchedulerMixin  # this request's own instance, timesteps already set
    generator: torch.Generator  # this request's own (stochastic schedulers draw from it every step)
    latents: torch.Tensor  # (k, C, h, w)
    # The conditioning rows of this request, (r, L, D) and (r, L) with r = 2k under guidance (negative
    # prompt rows first, then the prompt's, as diffusers concatenates them) or r = k without it.
    embeddings: torch.Tensor
    mask: torch.Tensor
    guidance_scale: float
    is_cancelled: Callable[[], bool]
    cancelled: bool = False

    def __post_init__(self) -> None:
        rows = self.latents.shape[0] * (2 if uses_cfg(self.guidance_scale) else 1)
        if self.embeddings.shape[0] != rows or self.mask.shape[0] != rows:
            raise ValueError(
                f"guidance {self.guidance_scale} needs {rows} conditioning rows, got {self.embeddings.shape[0]}"
            )


def guided_rows(
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    num_images: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's conditioning: each (1, L, D) embedding / (1, L) mask repeated per image, the negative
    prompt's rows first when guiding (`uncond` given only when guidance.uses_cfg)."""
    parts = [uncond, cond] if uncond is not None else [cond]
    embeddings = torch.cat([e.expand(num_images, -1, -1) for e, _ in parts])
    mask = torch.cat([m.expand(num_images, -1) for _, m in parts])
    return embeddings, mask


def cfg_denoise(transformer: Runner, slots: list[GuidedSlot], on_step: StepCallback) -> None:
    """Run every slot's scheduler to the end in lock-step (they share the step count); updates `latents`.

    Cancellation is polled before every step: a cancelled request leaves the batch at once.
    """
    total = len(slots[0].scheduler.timesteps)
    active: list[GuidedSlot] = []
    conditioning: dict[str, torch.Tensor] = {}
    for i in range(total):
        for slot in slots:
            slot.cancelled = slot.cancelled or slot.is_cancelled()
        still = [s for s in slots if not s.cancelled]
        if not still:
            return
        if [s.index for s in still] != [s.index for s in active]:
            # Re-stacked only when the batch changes: (R, L, D) and (R, L), R = all rows of all slots
            active = still
            conditioning = {
                "encoder_hidden_states": torch.cat([s.embeddings for s in active]),
                "encoder_attention_mask": torch.cat([s.mask for s in active]),
            }
        steps = [s.scheduler.timesteps[i] for s in active]
        inputs = []
        for slot, t in zip(active, steps, strict=True):
            rows = cfg_input(slot.latents, slot.guidance_scale)  # (r, C, h, w)
            inputs.append(slot.scheduler.scale_model_input(rows, t))
        sizes = [x.shape[0] for x in inputs]
        noise_pred = transformer.run(
            {
                "sample": torch.cat(inputs),  # (R, C, h, w)
                "timestep": torch.cat([t.float().expand(r) for t, r in zip(steps, sizes, strict=True)]),
                **conditioning,
            }
        )["noise_pred"]
        for slot, t, pred in zip(active, steps, noise_pred.split(sizes), strict=True):
            slot.latents = slot.scheduler.step(
                cfg_combine(pred, slot.guidance_scale),
                t,
                slot.latents,
                generator=slot.generator,
                return_dict=False,
            )[0]
            on_step(slot.index, i + 1, total)
