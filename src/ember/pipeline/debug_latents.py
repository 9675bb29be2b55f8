"""fal-ai/lora's `debug_latents` / `debug_per_pass_latents`: the latents a request's denoising loop produced,
handed back as float32 tensors next to its images.

- final latents, (k, C, h, w): the loop's output before the VAE (not divided by the VAE's scaling factor),
  what diffusers' StableDiffusionPipeline(output_type="latent") returns;
- per-pass latents, (S, k, C, h, w), and the timestep of each pass, (S,): the latents after every
  scheduler step (S = len(scheduler.timesteps)), what diffusers' callback_on_step_end sees as "latents".

The loop records passes into `GuidedSlot.passes` (ember.pipeline.guided_denoise); this module turns a
finished slot into the result's tensors and those into the Triton outputs LATENTS, PASS_LATENTS and
PASS_TIMESTEPS (model_repository/lora/config.pbtxt). The gateway writes them as safetensors files
(ember.endpoints.tensor_files).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.pipeline.guided_denoise import GuidedSlot

OUTPUT_NAMES = ("LATENTS", "PASS_LATENTS", "PASS_TIMESTEPS")


@dataclass
class DebugLatents:
    latents: torch.Tensor | None = None  # (k, C, h, w) float32, when debug_latents
    passes: torch.Tensor | None = None  # (S, k, C, h, w) float32, when debug_per_pass_latents
    timesteps: torch.Tensor | None = None  # (S,) float32: the timestep each pass stepped from


def recorder(per_pass: bool) -> list[torch.Tensor] | None:
    """The `GuidedSlot.passes` value for a request: a list to record into, or None (nothing kept)."""
    return [] if per_pass else None


def collect(slot: GuidedSlot, final: bool, per_pass: bool) -> DebugLatents | None:
    """What a finished (not cancelled) slot returns for the flags its request set; None for neither."""
    if not (final or per_pass):
        return None
    debug = DebugLatents()
    if final:
        debug.latents = slot.latents.to("cpu", torch.float32, copy=True)
    if per_pass:
        if not slot.passes:
            raise ValueError("debug_per_pass_latents: the denoising loop recorded no passes")
        debug.passes = torch.stack(slot.passes)
        debug.timesteps = slot.scheduler.timesteps[: len(slot.passes)].to("cpu", torch.float32)
    return debug


def debug_arrays(debug: DebugLatents | None) -> dict[str, np.ndarray]:
    """The Triton outputs for `debug`, each with the leading batch dimension of 1; {} when nothing was asked."""
    if debug is None:
        return {}
    arrays = {}
    for name, tensor in zip(OUTPUT_NAMES, (debug.latents, debug.passes, debug.timesteps), strict=True):
        if tensor is not None:
            arrays[name] = np.ascontiguousarray(tensor.numpy()[None])
    return arrays
