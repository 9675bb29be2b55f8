"""diffusers schedulers, one instance per request: they keep per-run state (step index, timesteps)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME


def load_scheduler_config(directory: Path) -> dict[str, Any]:
    """The scheduler_config.json of a model, read once at load time."""
    return dict(json.loads((directory / SCHEDULER_CONFIG_NAME).read_text(encoding="utf-8")))


def new_scheduler(
    config: dict[str, Any], num_inference_steps: int, strength: float | None = None
) -> SchedulerMixin:
    """A fresh scheduler of the config's class (`_class_name`), timesteps set, for one request.

    `strength` (LCMScheduler only): image-to-image timesteps as diffusers'
    LatentConsistencyModelImg2ImgPipeline sets them, `set_timesteps(n, strength=strength)`: n steps drawn
    from the first `original_inference_steps * strength` of the distillation schedule.
    """
    cls = getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config(config)
    if strength is None:
        scheduler.set_timesteps(num_inference_steps, device="cpu")
    else:
        scheduler.set_timesteps(num_inference_steps, device="cpu", strength=strength)
    return scheduler


def strength_timesteps(scheduler: SchedulerMixin, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The tail of the scheduler's timesteps that a `strength` run walks, as diffusers' SD img2img and
    inpainting pipelines cut it (`get_timesteps`): the last int(n * strength) steps. Sets the scheduler's
    begin index so its step counter starts there."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0) * scheduler.order
    scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:]


# fal's scheduler names (fal-ai/lora `scheduler`) -> diffusers class and the config entries that make
# it that sampler, applied over the base model's own scheduler config (betas, offsets) as A1111 /
# diffusers' scheduler docs map them.
FAL_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler A": ("EulerAncestralDiscreteScheduler", {}),
    "Euler (trailing timesteps)": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "LCM": ("LCMScheduler", {}),
    "LCM (trailing timesteps)": ("LCMScheduler", {"timestep_spacing": "trailing"}),
    "DDIM": ("DDIMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
    # fal-ai/illusion-diffusion's name for k-diffusion's DPM++ SDE with Karras sigmas. Its Brownian-tree
    # noise is seeded by the config's noise_sampler_seed (random when None): sde_noise_config sets it.
    "DPM++ Karras SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
}


def sde_noise_config(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """`config` with DPMSolverSDEScheduler's Brownian-tree noise seeded from the request's seed.

    diffusers' pipelines do not pass their generator to this scheduler (its step takes none): left alone
    it draws a random tree seed, so the same seed would give a different image on every call. Other
    classes ignore the entry."""
    if config.get("_class_name") != "DPMSolverSDEScheduler":
        return config
    return {**config, "noise_sampler_seed": seed % 2**63}  # torchsde's entropy must be non-negative


def fal_scheduler_config(
    base: dict[str, Any],
    name: str | None,
    prediction_type: str | None = None,
    rescale_betas_zero_snr: bool = False,
) -> dict[str, Any]:
    """The config of fal scheduler `name` (None: the model's own) over the model's `base` config.

    prediction_type and rescale_betas_zero_snr override the model's; diffusers' from_config ignores
    entries a class does not take, as when a pipeline swaps schedulers with `from_config`.
    """
    config = dict(base)
    if name is not None:
        try:
            class_name, overrides = FAL_SCHEDULERS[name]
        except KeyError as exc:
            raise ValueError(f"scheduler must be one of {sorted(FAL_SCHEDULERS)}, not {name!r}") from exc
        config["_class_name"] = class_name
        config.update(overrides)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    if rescale_betas_zero_snr:
        config["rescale_betas_zero_snr"] = True
    return config


def new_scheduler_with(
    config: dict[str, Any],
    num_inference_steps: int,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
) -> SchedulerMixin:
    """A fresh scheduler set for `num_inference_steps`, or for an explicit `timesteps` / `sigmas`
    schedule (then the step count is its length), as diffusers' `retrieve_timesteps` does.

    ValueError names the override when the class's set_timesteps does not take it.
    """
    import inspect

    cls = getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config(config)
    accepted = set(inspect.signature(scheduler.set_timesteps).parameters)
    if timesteps is not None:
        if "timesteps" not in accepted:
            raise ValueError(f"timesteps: {cls.__name__} does not take a custom timestep schedule")
        scheduler.set_timesteps(timesteps=timesteps, device="cpu")
    elif sigmas is not None:
        if "sigmas" not in accepted:
            raise ValueError(f"sigmas: {cls.__name__} does not take a custom sigma schedule")
        scheduler.set_timesteps(sigmas=sigmas, device="cpu")
    else:
        scheduler.set_timesteps(num_inference_steps, device="cpu")
    return scheduler


class SchedulerFactory:
    """Fresh per-request schedulers without per-request set-up: the first request of a given
    (steps, strength) builds a template (from_config + set_timesteps: ~3 ms on a CPU core, mostly config
    handling), every request gets its own deep copy of it (~1 ms; still one instance per request, STYLE 7).
    Templates are never stepped, so they stay pristine."""

    def __init__(self, config: dict[str, Any], max_templates: int = 64):
        self.config = config
        self._templates: dict[tuple[int, float | None], SchedulerMixin] = {}
        self._max = max_templates

    def __call__(self, num_inference_steps: int, strength: float | None = None) -> SchedulerMixin:
        key = (num_inference_steps, strength)
        template = self._templates.get(key)
        if template is None:
            template = new_scheduler(self.config, num_inference_steps, strength)
            if len(self._templates) < self._max:  # strengths are floats: bound the cache
                self._templates[key] = template
        return copy.deepcopy(template)
