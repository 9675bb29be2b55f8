"""fal-ai/lora's `controlnets` and `controlnet_guess_mode`: any number of SD1.5 ControlNets per request, as
diffusers' StableDiffusionControlNetPipeline runs a MultiControlNetModel (per-unit conditioning scale and
control_guidance_start / end, residuals summed; guess mode = the ControlNets see only the conditional half
of the CFG batch, residuals weighted 0.1 .. 1 shallow to deep).

The per-step maths is ember.pipeline.controlnet (shared with fal-ai/illusion-diffusion); this stage adds what
is particular to fal-ai/lora:

- ControlNets are named per request (`path`: an HF id resolved through the HF cache, or a directory under
  EMBER_LORA_MODEL_ROOT, exactly as `model_name`; `variant` picks `diffusion_pytorch_model.<variant>.*`)
  and loaded on first use on the torch runtime; at most EMBER_LORA_MAX_CONTROLNETS stay resident (LRU).
- The base model's UNet is wrapped a second time as the residual-taking UNet of ember.specs.controlnet,
  sharing the same module (so fused LoRAs reach it, and no weights are copied). A batch where any request
  has a ControlNet runs on it; requests without one get zero residuals, which leaves their result exact.
- `mask_url`: the unit's residuals are confined to the mask's region at each residual's latent grid
  (ember.pipeline.controlnet.masked). diffusers has no such option; this is fal's documented meaning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ember.pipeline.controlnet import ControlNetUnit, control_image, control_mask
from ember.pipeline.guided_denoise import Controlled, GuidedSlot
from ember.runtime import Runner, torch_dtype
from ember.settings import Settings
from ember.specs.controlnet import CONTROLLED_UNET, CONTROLNET, ControlledUNet, SdControlNet, residual_layout

if TYPE_CHECKING:
    from ember.pipeline.lora import BaseModel, LoraRequest

MAX_CONTROL_PIXELS = 4096 * 4096  # a control image or mask, as decoded by the gateway
# A weights variant names a file, diffusion_pytorch_model.<variant>.safetensors: a plain word, nothing path-like.
VARIANT = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True)
class ControlNetRef:
    """Which ControlNet: `source` a local diffusers ControlNet directory (config.json at its root; an HF
    id already resolved to its snapshot), `variant` the weights file variant (e.g. "fp16") or None."""

    source: str
    variant: str | None = None


@dataclass(frozen=True)
class ControlNetInput:
    """One entry of fal's `controlnets`: the network, its control image and optional mask, and when and
    how strongly it conditions."""

    ref: ControlNetRef
    image: np.ndarray = field(compare=False, repr=False)  # (H, W, 3) uint8 RGB, any size
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W) uint8, white = apply
    conditioning_scale: float = 1.0
    start: float = 0.0  # start_percentage: fraction of the schedule
    end: float = 1.0  # end_percentage


def check_controlnets(controlnets: Sequence[ControlNetInput]) -> list[str]:
    """Problems with a request's ControlNets, as messages naming the fal field; empty when they can run."""
    problems = []
    for i, c in enumerate(controlnets):
        at = f"controlnets[{i}]"
        image = c.image
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            problems.append(
                f"{at}.image_url must decode to (H, W, 3) uint8 RGB, not {image.dtype} {list(image.shape)}"
            )
        elif min(image.shape[:2]) < 8 or image.shape[0] * image.shape[1] > MAX_CONTROL_PIXELS:
            problems.append(f"{at}.image_url: at least 8 px a side and at most {MAX_CONTROL_PIXELS} pixels")
        if c.mask is not None:
            if c.mask.dtype != np.uint8 or c.mask.ndim != 2:
                problems.append(
                    f"{at}.mask_url must decode to (H, W) uint8 grey, not {c.mask.dtype} {list(c.mask.shape)}"
                )
            elif c.mask.shape != image.shape[:2]:
                problems.append(
                    f"{at}.mask_url: the mask ({c.mask.shape[1]}x{c.mask.shape[0]}) must have the control "
                    f"image's size ({image.shape[1]}x{image.shape[0]})"
                )
        if c.ref.variant is not None and not VARIANT.fullmatch(c.ref.variant):
            problems.append(f"{at}.variant must be a weights variant name like 'fp16', not {c.ref.variant!r}")
        if not (math.isfinite(c.conditioning_scale) and 0.0 <= c.conditioning_scale <= 2.0):
            problems.append(f"{at}.conditioning_scale must be from 0 to 2, not {c.conditioning_scale}")
        if not (0.0 <= c.start < c.end <= 1.0):
            problems.append(
                f"{at}: start_percentage ({c.start}) must be below end_percentage ({c.end}), both from 0 to 1"
            )
    return problems


def parse_controlnets(
    options: Mapping[str, Any], arrays: Mapping[str, np.ndarray | None], model_root: Path
) -> tuple[ControlNetInput, ...]:
    """OPTIONS "controlnets": [{"path", "variant", "image": MEDIA index, "mask": MEDIA index | null,
    "conditioning_scale", "start_percentage", "end_percentage"}] -> ControlNetInputs; ValueError names
    the field."""
    # Imported here: lora_io imports ember.pipeline.lora, which imports this module.
    from ember.pipeline.lora_io import media_array, resolve_model

    out = []
    for i, entry in enumerate(options.get("controlnets") or []):
        at = f"controlnets[{i}]"
        source = resolve_model(str(entry["path"]), model_root, "config.json", field=f"{at}.path")
        mask = entry.get("mask")
        out.append(
            ControlNetInput(
                ref=ControlNetRef(source, entry.get("variant") or None),
                image=media_array(arrays, entry["image"], f"OPTIONS.{at}.image"),
                mask=None if mask is None else media_array(arrays, mask, f"OPTIONS.{at}.mask"),
                conditioning_scale=float(entry.get("conditioning_scale", 1.0)),
                start=float(entry.get("start_percentage", 0.0)),
                end=float(entry.get("end_percentage", 1.0)),
            )
        )
    return tuple(out)


def _controlnet_loader(variant: str | None) -> Callable[[str, str | None, torch.dtype], nn.Module]:
    def load(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(source, revision=revision, dtype=dtype, variant=variant)
        residual_layout(controlnet.config)  # SD1.5-shaped, or a ValueError that says so
        return SdControlNet(controlnet.eval())

    return load


def _read_config(directory: str) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))


def _misfit(controlnet: Mapping[str, Any], unet: Mapping[str, Any]) -> str | None:
    """Why a ControlNet cannot condition this UNet (its residuals must match the skip connections), or None."""
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels"):
        theirs, ours = controlnet.get(key), unet.get(key)
        if (list(theirs) if isinstance(theirs, list | tuple) else theirs) != (
            list(ours) if isinstance(ours, list | tuple) else ours
        ):
            return f"it does not fit the base model's UNet ({key} {theirs} vs {ours}); use a ControlNet for this base"
    return None


class ControlNets:
    """The ControlNet runners resident in one lora Triton model, by (source, variant), and the residual-
    taking wrapper of each resident base model's UNet."""

    def __init__(self, settings: Settings, capacity: int | None = None):
        self.settings = settings
        self.capacity = capacity or settings.lora_max_controlnets
        self._runners: OrderedDict[ControlNetRef, tuple[Runner, dict[str, Any]]] = OrderedDict()
        self._controlled: weakref.WeakKeyDictionary[BaseModel, tuple[Runner, Controlled]] = (
            weakref.WeakKeyDictionary()
        )

    def runner(self, ref: ControlNetRef, log: Callable[[str], None]) -> tuple[Runner, dict[str, Any]]:
        """The ControlNet's runner and config, loading it on first use (the least recently used leaves)."""
        hit = self._runners.get(ref)
        if hit is not None:
            self._runners.move_to_end(ref)
            return hit
        from ember.runtime.torch_runner import TorchRunner

        log(f"loading ControlNet {ref.source} (first use; later requests are warm)")
        start = time.perf_counter()
        spec = dataclasses.replace(CONTROLNET, load=_controlnet_loader(ref.variant))
        runner = TorchRunner(spec, ref.source, None, self.settings.device, torch_dtype(self.settings.dtype))
        while len(self._runners) >= self.capacity:
            evicted, _ = self._runners.popitem(last=False)
            log(f"unloading ControlNet {evicted.source} (EMBER_LORA_MAX_CONTROLNETS={self.capacity})")
        hit = self._runners[ref] = (runner, _read_config(ref.source))
        log(f"ControlNet {ref.source} loaded in {time.perf_counter() - start:.1f}s")
        return hit

    def controlled_unet(self, model: BaseModel) -> tuple[Runner, Controlled]:
        """The base model's UNet taking residual inputs (ember.specs.controlnet.CONTROLLED_UNET), built once
        per resident model around the same module: LoRA refits of model.unet reach it."""
        hit = self._controlled.get(model)
        if hit is not None:
            return hit
        from ember.runtime.torch_runner import TorchRunner

        wrapper = getattr(model.unet, "module", None)  # TorchRunner's spec wrapper (lora.BaseModel: torch)
        if wrapper is None:
            raise ValueError(
                'ControlNets run with the base model on the torch runtime: set runtime = "torch" in '
                "models.toml [lora.sdv1-5] (the default)"
            )
        unet = wrapper.unet  # the diffusers UNet2DConditionModel inside the spec wrapper
        config = dict(unet.config)
        residual_layout(config)  # ValueError unless SD1.5-shaped
        runner = TorchRunner(
            CONTROLLED_UNET,
            "",
            None,
            self.settings.device,
            torch_dtype(self.settings.dtype),
            module=ControlledUNet(unet),
        )
        hit = self._controlled[model] = (runner, Controlled(config))
        return hit

    def attach(
        self,
        model: BaseModel,
        slots: Sequence[GuidedSlot],
        requests: Mapping[int, LoraRequest],
        width: int,
        height: int,
        log: Callable[[int, str], None],
    ) -> dict[int, str]:
        """Give each slot its request's ControlNet units (control images resized to width x height, masks
        likewise); returns the errors of the requests that cannot run (by slot index), naming the field."""
        errors: dict[int, str] = {}
        for slot in slots:
            r = requests[slot.index]
            if not r.controlnets:
                continue
            try:
                unet_config = self.controlled_unet(model)[1].unet_config
            except ValueError as exc:
                errors[slot.index] = f"controlnets: the base model cannot take ControlNets: {exc}"
                continue
            units = []
            for i, c in enumerate(r.controlnets):
                try:
                    runner, config = self.runner(c.ref, lambda message, at=slot.index: log(at, message))
                    misfit = _misfit(config, unet_config)
                except (OSError, ValueError) as exc:  # missing files or variant, not a ControlNet
                    misfit = str(exc)
                if misfit is not None:
                    errors[slot.index] = f"controlnets[{i}].path: {misfit}"
                    break
                device = model.unet.device
                units.append(
                    ControlNetUnit(
                        runner,
                        control_image(c.image, width, height).to(device),
                        c.conditioning_scale,
                        c.start,
                        c.end,
                        guess_mode=r.controlnet_guess_mode,
                        mask=None if c.mask is None else control_mask(c.mask, width, height).to(device),
                    )
                )
            else:
                slot.controls = tuple(units)
        return errors

    def denoiser(self, model: BaseModel, slots: Sequence[GuidedSlot]) -> tuple[Runner, Controlled | None]:
        """The UNet runner for this batch: the residual-taking one when any slot has ControlNets."""
        if any(slot.controls for slot in slots):
            return self.controlled_unet(model)
        return model.unet, None
