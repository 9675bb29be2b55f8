"""The denoising loop for epsilon-prediction (and v-prediction) UNets with classifier-free guidance and
optional ControlNets, as diffusers' StableDiffusionPipeline / StableDiffusionControlNetPipeline run it,
for a batch of requests in lock-step: one ControlNet call per distinct ControlNet and one UNet call per
step for every request still running. Each request keeps its own scheduler (any diffusers class, so the
timesteps walked are `scheduler.timesteps`, 2n - 1 for second-order samplers) and its own generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import SchedulerMixin

from ember.pipeline.controlnet import (
    ControlNetUnit,
    ControlRows,
    Layout,
    controlnet_residuals,
    zero_residuals,
)
from ember.pipeline.guidance import cfg_combine, cfg_input
from ember.pipeline.requests import StepCallback
from ember.runtime import Runner
from ember.specs.controlnet import RESIDUAL_NAMES, residual_layout


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator, eta: float = 0.0) -> dict[str, Any]:
    """What diffusers' prepare_extra_step_kwargs passes to scheduler.step: eta (DDIM, TCD) and the
    generator, where the class takes them. Called once per request, before the loop."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {name: value for name, value in (("eta", eta), ("generator", generator)) if name in accepted}


@dataclass
class GuidedSlot:
    """One request's share of a batched run."""

    index: int  # the request's position in the list given to the pipeline (for callbacks)
    scheduler: SchedulerMixin  # this request's own instance, timesteps set
    latents: torch.Tensor  # (k, C, h, w)
    embeddings: torch.Tensor  # (2k, 77, D) [negative; prompt] with CFG, else (k, 77, D)
    guidance_scale: float
    step_kwargs: dict[str, Any]  # step_kwargs(): generator / eta for scheduler.step
    is_cancelled: Callable[[], bool]
    controls: Sequence[ControlNetUnit] = ()
    cancelled: bool = False
    # A list to record into: the latents after every scheduler step, (k, C, h, w) float32 on the CPU, as
    # diffusers' callback_on_step_end sees them (fal's debug_per_pass_latents); None records nothing.
    passes: list[torch.Tensor] | None = None
    # Extra per-request UNet inputs, rows as `embeddings` (IP-Adapter image embeds and masks,
    # ember.pipeline.ip_adapter): concatenated across the batch under the same names.
    unet_feeds: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class Controlled:
    """The UNet takes ControlNet residuals (ember.specs.controlnet.CONTROLLED_UNET, or SDXL's
    ember.specs.controlnet_xl.XL_CONTROLLED_UNET): its config sizes the zero residuals of a step where no
    request has an active unit."""

    unet_config: dict[str, Any] = field(default_factory=dict)
    residual_names: Sequence[str] = RESIDUAL_NAMES  # the controlled UNet's residual inputs, in order
    layout: Layout = residual_layout  # their (channels, level) from unet_config
    # GuidedSlot.unet_feeds the ControlNets take too, with the same rows (SDXL: text_embeds, time_ids)
    controlnet_feeds: tuple[str, ...] = ()

    def feeds(
        self,
        slots: Sequence[tuple[Sequence[ControlNetUnit], int, int]],
        sample: torch.Tensor,  # (B, C, h, w), the UNet's input this step
        timestep: torch.Tensor,  # (B,)
        embeddings: torch.Tensor,  # (B, 77, D)
        step: int,
        total: int,
        unet_feeds: Mapping[str, torch.Tensor] | None = None,  # the batch's extra UNet inputs, B rows
    ) -> dict[str, torch.Tensor]:
        """The UNet's residual inputs for one step. `slots` in batch order: (units, rows in the batch,
        conditional rows k) per request; zeros when no unit acts (x + 0 = x: the plain UNet's result)."""
        rows, offset = [], 0
        for units, size, k in slots:
            rows.append(ControlRows(units, offset, size, k))
            offset += size
        extra = {name: (unet_feeds or {})[name] for name in self.controlnet_feeds}
        residuals = controlnet_residuals(rows, sample, timestep, embeddings, step, total, extra)
        if residuals is None:
            residuals = zero_residuals(
                self.unet_config,
                *sample.shape[:1],
                *sample.shape[2:],
                sample,
                self.residual_names,
                self.layout,
            )
        return residuals


def guided_denoise(
    unet: Runner,
    slots: list[GuidedSlot],
    on_step: StepCallback,
    controlled: Controlled | None = None,
) -> None:
    """Sample all slots in lock-step (equal timestep counts); each slot's latents end denoised.

    Cancellation is polled before every step: a cancelled request leaves the batch at once.
    """
    total = len(slots[0].scheduler.timesteps)
    for i in range(total):
        for slot in slots:
            slot.cancelled = slot.cancelled or slot.is_cancelled()
        active = [s for s in slots if not s.cancelled]
        if not active:
            return
        steps = [s.scheduler.timesteps[i] for s in active]
        # (B, C, h, w): per request [x; x] with CFG, scaled by its own scheduler (sigma-dependent for Euler)
        sample = torch.cat(
            [s.scheduler.scale_model_input(cfg_input(s.latents, s.guidance_scale), t) for s, t in zip(active, steps)]
        )
        sizes = [s.rows for s in active]
        timestep = torch.cat([t.float().reshape(1).expand(n) for t, n in zip(steps, sizes, strict=True)])  # (B,)
        embeddings = torch.cat([s.embeddings for s in active])  # (B, 77, D)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeddings}
        # every slot of a batch has the same extra inputs (SDXL's text_embeds / time_ids, IP-Adapter's)
        extra = {name: torch.cat([s.unet_feeds[name] for s in active]) for name in active[0].unet_feeds}
        if controlled is not None:
            units = [(s.controls, n, s.latents.shape[0]) for s, n in zip(active, sizes, strict=True)]
            feeds.update(controlled.feeds(units, sample, timestep, embeddings, i, total, extra))
        feeds.update(extra)
        noise_pred = unet.run(feeds)["noise_pred"]
        for s, t, pred in zip(active, steps, noise_pred.split(sizes), strict=True):
            guided = cfg_combine(pred, s.guidance_scale)
            s.latents = s.scheduler.step(guided, t, s.latents, **s.step_kwargs, return_dict=False)[0]
            if s.passes is not None:
                s.passes.append(s.latents.to("cpu", torch.float32, copy=True))
            on_step(s.index, i + 1, total)
