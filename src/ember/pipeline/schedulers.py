"""diffusers schedulers, one instance per request: they keep per-run state (step index, timesteps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
from diffusers import SchedulerMixin
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME


def load_scheduler_config(directory: Path) -> dict[str, Any]:
    """The scheduler_config.json of a model, read once at load time."""
    return dict(json.loads((directory / SCHEDULER_CONFIG_NAME).read_text(encoding="utf-8")))


def new_scheduler(config: dict[str, Any], num_inference_steps: int) -> SchedulerMixin:
    """A fresh scheduler of the config's class (`_class_name`), timesteps set, for one request."""
    cls = getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    return scheduler
