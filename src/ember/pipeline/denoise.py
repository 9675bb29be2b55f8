"""The denoising loop, shared by every request in a batch: one UNet call per step for all of them.

Each request keeps its own scheduler and generator, so batching changes no request's maths: the UNet is
per-sample (group norm, attention within a sample), and the scheduler step runs per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import SchedulerMixin

from ember.pipeline.controlnet import ControlNetUnit
from ember.pipeline.guided_denoise import Controlled
from ember.pipeline.requests import StepCallback
from ember.runtime import Runner


@dataclass
class InpaintBlend:
    """Inpainting with a plain (4-channel) LCM UNet, as diffusers' StableDiffusionInpaintPipeline does it:
    after every step, outside the mask the latents are replaced by the input image's latents noised to the
    next timestep (unnoised after the last step), so only the masked area is generated."""

    image_latents: torch.Tensor  # (k, C, h, w) scaled latents of the input image
    noise: torch.Tensor  # (k, C, h, w) the noise the initial latents were made with
    mask: torch.Tensor  # (k, 1, h, w) 1 = fill, nearest-resized to the latent grid

    def __call__(
        self, scheduler: SchedulerMixin, timesteps: torch.Tensor, i: int, latents: torch.Tensor
    ) -> torch.Tensor:
        known = self.image_latents
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(known, self.noise, torch.tensor([timesteps[i + 1]]))
        return (1 - self.mask) * known + self.mask * latents


@dataclass
class DenoiseSlot:
    """One request's share of a batched denoising run."""

    index: int  # the request's position in the list given to the pipeline (for callbacks)
    scheduler: SchedulerMixin  # this request's own instance, timesteps already set
    generator: torch.Generator  # this request's own; LCM draws fresh noise between steps
    latents: torch.Tensor  # (k, C, h, w), k = the request's num_images
    text_embeddings: torch.Tensor  # (k, 77, D)
    timestep_cond: torch.Tensor  # (k, time_cond_proj_dim)
    is_cancelled: Callable[[], bool]
    # More per-image UNet inputs by name, e.g. SDXL's text_embeds (k, 1280) and time_ids (k, 6); every slot
    # of one batch has the same names (the pipeline's batch key keeps models apart).
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    # The timesteps this request walks: None = all of scheduler.timesteps; a tail of them for inpainting
    # with strength < 1 (diffusers' get_timesteps). Slots of one batch walk the same number of steps.
    timesteps: torch.Tensor | None = None
    inpaint: InpaintBlend | None = None
    controls: Sequence[ControlNetUnit] = ()  # ControlNets conditioning this request (lcm_denoise `controlled`)
    denoised: torch.Tensor | None = None  # (k, C, h, w) after the last step
    cancelled: bool = False

    def __post_init__(self) -> None:
        if self.timesteps is None:
            self.timesteps = self.scheduler.timesteps


def lcm_denoise(
    unet: Runner, slots: list[DenoiseSlot], on_step: StepCallback, controlled: Controlled | None = None
) -> None:
    """LCM multistep sampling for all slots in lock-step (they share the step count). Fills `denoised`.

    With `controlled`, `unet` takes ControlNet residuals (ember.specs.controlnet.CONTROLLED_LCM_UNET): each
    step first runs the slots' ControlNets on the same sample (LCM's scale_model_input is the identity) and
    embeddings, without timestep_cond (SD1.5 ControlNets have no guidance embedding), as diffusers'
    StableDiffusionControlNetPipeline does for an LCM UNet.

    Cancellation is polled before every step: a cancelled request leaves the batch at once, so at most
    the step already running is spent on it. The loop ends when every slot is done or cancelled.
    """
    total = len(slots[0].timesteps)
    active: list[DenoiseSlot] = []
    conditioning: dict[str, torch.Tensor] = {}
    for i in range(total):
        for slot in slots:
            slot.cancelled = slot.cancelled or slot.is_cancelled()
        still = [s for s in slots if not s.cancelled]
        if not still:
            return
        if [s.index for s in still] != [s.index for s in active]:
            # Per-step constants, re-stacked only when the batch changes: (B, 77, D), (B, time_cond)
            active = still
            conditioning = {
                "encoder_hidden_states": torch.cat([s.text_embeddings for s in active]),
                "timestep_cond": torch.cat([s.timestep_cond for s in active]),
                **{name: torch.cat([s.added_cond[name] for s in active]) for name in active[0].added_cond},
            }
        steps = [s.timesteps[i] for s in active]
        sizes = [s.latents.shape[0] for s in active]
        feeds = {
            "sample": torch.cat([s.latents for s in active]),  # (B, C, h, w)
            "timestep": torch.cat([t.float().expand(k) for t, k in zip(steps, sizes, strict=True)]),  # (B,)
            **conditioning,
        }
        if controlled is not None:
            units = [(s.controls, k, k) for s, k in zip(active, sizes, strict=True)]  # no CFG: all rows cond.
            feeds.update(
                controlled.feeds(
                    units, feeds["sample"], feeds["timestep"], conditioning["encoder_hidden_states"], i, total
                )
            )
        noise_pred = unet.run(feeds)["noise_pred"]
        for slot, t, pred in zip(active, steps, noise_pred.split(sizes), strict=True):
            slot.latents, slot.denoised = slot.scheduler.step(
                pred, t, slot.latents, generator=slot.generator, return_dict=False
            )
            if slot.inpaint is not None:
                # diffusers' inpainting pipeline continues from, and finally decodes, the blended latents
                slot.latents = slot.denoised = slot.inpaint(slot.scheduler, slot.timesteps, i, slot.latents)
            on_step(slot.index, i + 1, total)
