"""Würstchen-style denoising with classifier-free guidance, shared by every request in a batch: one network
call per step for all of them. Stable Cascade runs it twice, once per stage: the prior (stage C, conditioned
on text) and the decoder (stage B, conditioned on stage C's output), with their own step counts and scales.

The networks take a timestep *ratio* in [0, 1] (DDPMWuerstchenScheduler's timesteps) and named
conditioning tensors, which differ per stage; a slot carries them as a dict so one loop serves both.
Each request keeps its own scheduler and generator (the scheduler draws noise every step) and its own
guidance scale, so batching changes no request's maths: the networks are per-sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin

from ember.pipeline.requests import StepCallback
from ember.runtime import Runner


@dataclass
class CascadeSlot:
    """One request's share of one stage's batched run. k = the request's num_images."""

    index: int  # the request's position in the list given to the pipeline (for callbacks)
    scheduler: SchedulerMixin  # this request's own instance, timesteps already set
    # This request's own, shared by both stages (in diffusers' order) as the combined pipeline does.
    generator: torch.Generator
    latents: torch.Tensor  # (k, C, h, w)
    # The network's conditioning inputs by name, (k, ...) each; `uncond` has the same names, None without
    # guidance (diffusers guides only when guidance_scale > 1).
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    guidance_scale: float
    is_cancelled: Callable[[], bool]
    cancelled: bool = False

    @property
    def timesteps(self) -> torch.Tensor:
        """The ratios the network is called at: DDPMWuerstchenScheduler.set_timesteps(n) gives n + 1 values
        from 1 to 0, and the pipelines step through all but the last (0 is where the last step lands)."""
        return self.scheduler.timesteps[:-1]

    def rows(self, name: str) -> torch.Tensor:
        """(r, ...) rows of one conditioning input: the prompt's k rows, then the negative's k under guidance
        (diffusers' order: torch.cat([cond, uncond]), then predictions .chunk(2))."""
        if self.uncond is None:
            return self.cond[name]
        return torch.cat([self.cond[name], self.uncond[name]])


def cascade_denoise(
    network: Runner, slots: list[CascadeSlot], on_step: StepCallback, step_offset: int, total: int
) -> None:
    """Run every slot's scheduler to the end in lock-step (they share the step count); updates `latents`.

    Progress is reported as (step_offset + step, total), so two stages count up one bar. Cancellation is
    polled before every step: a cancelled request leaves the batch at once (and skips later stages).
    """
    names = list(slots[0].cond)
    steps = len(slots[0].timesteps)
    active: list[CascadeSlot] = []
    conditioning: dict[str, torch.Tensor] = {}
    for i in range(steps):
        for slot in slots:
            slot.cancelled = slot.cancelled or slot.is_cancelled()
        still = [s for s in slots if not s.cancelled]
        if not still:
            return
        if [s.index for s in still] != [s.index for s in active]:
            # Re-stacked only when the batch changes: (R, ...) per input, R = all rows of all slots
            active = still
            conditioning = {name: torch.cat([s.rows(name) for s in active]) for name in names}
        ratios = [s.timesteps[i] for s in active]
        samples = [torch.cat([s.latents] * 2) if s.uncond is not None else s.latents for s in active]
        sizes = [x.shape[0] for x in samples]
        predicted = network.run(
            {
                # (R, C, h, w) and (R,): each slot's rows at its own timestep ratio
                "sample": torch.cat(samples),
                "timestep_ratio": torch.cat([t.expand(r) for t, r in zip(ratios, sizes, strict=True)]),
                **conditioning,
            }
        )["predicted"]
        for slot, t, pred in zip(active, ratios, predicted.split(sizes), strict=True):
            if slot.uncond is not None:
                text, uncond = pred.chunk(2)
                pred = torch.lerp(uncond, text, slot.guidance_scale)
            k = slot.latents.shape[0]
            # DDPMWuerstchenScheduler.step takes the ratio per sample, (k,), as the pipelines pass it.
            slot.latents = slot.scheduler.step(
                pred, t.expand(k), slot.latents, generator=slot.generator, return_dict=False
            )[0]
            on_step(slot.index, step_offset + i + 1, total)
