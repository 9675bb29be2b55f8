"""fal-ai/lora's `controlnets` and `controlnet_guess_mode`: any number of ControlNets per request, as
diffusers' StableDiffusionControlNetPipeline (SD1.5 bases) and StableDiffusionXLControlNetPipeline (SDXL
bases: the ControlNets also take the UNet's text_embeds / time_ids rows) run a MultiControlNetModel
(per-unit conditioning scale and control_guidance_start / end, residuals summed; guess mode = the
ControlNets see only the conditional half of the CFG batch, residuals weighted 0.1 .. 1 shallow to deep).
A ControlNet of the other family than the base (SD1.5 on SDXL or the reverse) is refused naming its path.

The per-step maths is ember.pipeline.controlnet (shared with fal-ai/illusion-diffusion); this stage adds what
is particular to fal-ai/lora:

- ControlNets are named per request (`path`: an HF id resolved through the HF cache, or a directory under
  EMBER_LORA_MODEL_ROOT, exactly as `model_name`; `variant` picks `diffusion_pytorch_model.<variant>.*`)
  and loaded on first use on the torch runtime; at most EMBER_LORA_MAX_CONTROLNETS stay resident (LRU).
- Single-file ControlNets (`path` a .safetensors file: a URL the gateway streamed under the model root,
  or a file there) load against `config_url`'s config.json (the gateway sends its content; written once
  under <export_dir>/lora-controlnet-configs/<sha256>/; original `control_model.*` key names converted
  with diffusers' single-file tables, diffusers' own names as they are, strictly), else against the
  built-in config of the weights' family (ember/specs/single_file_configs/controlnet-sd15 | -sdxl: the
  full-size SD1.5 / SDXL ControlNet), refused with a message asking for config_url when they do not fit.
- The base model's UNet is wrapped a second time as the residual-taking UNet of ember.specs.controlnet,
  sharing the same module (so fused LoRAs reach it, and no weights are copied). A batch where any request
  has a ControlNet runs on it; requests without one get zero residuals, which leaves their result exact.
- `mask_url`: the unit's residuals are confined to the mask's region at each residual's latent grid
  (ember.pipeline.controlnet.masked). diffusers has no such option; this is fal's documented meaning.
- `ip_adapter_index` (InstantID's IdentityNet): the unit reads ip_adapter[k]'s projected image tokens as
  its encoder_hidden_states instead of the prompt (ember.pipeline.instantid, attached after the IP-Adapter
  stage has the request's image embeds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
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
from ember.specs.checkpoint_keys import controlnet_file_family
from ember.specs.controlnet import CONTROLLED_UNET, CONTROLNET, ControlledUNet, SdControlNet, residual_layout
from ember.specs.controlnet_xl import (
    XL_CONTROLLED_UNET,
    XL_CONTROLNET,
    XL_RESIDUAL_NAMES,
    XLControlledUNet,
    XLControlNet,
    is_xl_controlnet,
    xl_residual_layout,
)

if TYPE_CHECKING:
    from ember.pipeline.lora import BaseModel, LoraRequest

MAX_CONTROL_PIXELS = 4096 * 4096  # a control image or mask, as decoded by the gateway
MAX_CONFIG_CHARS = 64 * 1024  # a ControlNet config.json (config_url): about 1 KiB in practice
CONFIGS_DIR = "lora-controlnet-configs"  # under EMBER_EXPORT_DIR: config_url configs, by sha256
BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "specs" / "single_file_configs"
# A weights variant names a file, diffusion_pytorch_model.<variant>.safetensors: a plain word, nothing path-like.
VARIANT = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True)
class ControlNetRef:
    """Which ControlNet: `source` a local diffusers ControlNet directory (config.json at its root; an HF
    id already resolved to its snapshot) or a single .safetensors file; `variant` the weights file variant
    (e.g. "fp16") of a directory, or None; `config` (single files only) config_url's config.json as
    canonical JSON text, or None for the built-in config of the weights' family."""

    source: str
    variant: str | None = None
    config: str | None = None

    @property
    def single_file(self) -> bool:
        return Path(self.source).is_file()


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
    # InstantID: condition on ip_adapter[k]'s projected image tokens instead of the prompt (instantid.py)
    ip_adapter_index: int | None = None


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
        if c.ref.variant is not None and c.ref.single_file:
            problems.append(
                f"{at}.variant picks a file in a ControlNet directory; {at}.path is a single file"
            )
        elif c.ref.variant is not None and not VARIANT.fullmatch(c.ref.variant):
            problems.append(f"{at}.variant must be a weights variant name like 'fp16', not {c.ref.variant!r}")
        if not (math.isfinite(c.conditioning_scale) and 0.0 <= c.conditioning_scale <= 2.0):
            problems.append(f"{at}.conditioning_scale must be from 0 to 2, not {c.conditioning_scale}")
        if not (0.0 <= c.start < c.end <= 1.0):
            problems.append(
                f"{at}: start_percentage ({c.start}) must be below end_percentage ({c.end}), both from 0 to 1"
            )
        if c.ip_adapter_index is not None and c.ip_adapter_index < 0:
            problems.append(f"{at}.ip_adapter_index must be 0 or more, not {c.ip_adapter_index}")
    return problems


def parse_controlnets(
    options: Mapping[str, Any], arrays: Mapping[str, np.ndarray | None], model_root: Path
) -> tuple[ControlNetInput, ...]:
    """OPTIONS "controlnets": [{"path", "variant", "config": {config.json} | null, "image": MEDIA index,
    "mask": MEDIA index | null, "conditioning_scale", "start_percentage", "end_percentage"}] ->
    ControlNetInputs; ValueError names the field. `path` may be a .safetensors file under the root."""
    # Imported here: lora_io imports ember.pipeline.lora, which imports this module.
    from ember.pipeline.lora_io import media_array, resolve_model

    out = []
    for i, entry in enumerate(options.get("controlnets") or []):
        at = f"controlnets[{i}]"
        source = resolve_model(
            str(entry["path"]), model_root, "config.json", field=f"{at}.path", single_file=True
        )
        config = entry.get("config")
        if config is not None:
            text = json.dumps(config, sort_keys=True)
            if not isinstance(config, dict) or len(text) > MAX_CONFIG_CHARS:
                raise ValueError(
                    f"{at}.config_url: a ControlNet config.json is a JSON object of at most 64 KiB"
                )
            if not Path(source).is_file():
                raise ValueError(
                    f"{at}.config_url: only single-file weights take a config; {at}.path has its own"
                )
            config = text
        mask = entry.get("mask")
        index = entry.get("ip_adapter_index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ValueError(f"{at}.ip_adapter_index must be an integer index into ip_adapter, not {index!r}")
        out.append(
            ControlNetInput(
                ref=ControlNetRef(source, entry.get("variant") or None, config),
                image=media_array(arrays, entry["image"], f"OPTIONS.{at}.image"),
                mask=None if mask is None else media_array(arrays, mask, f"OPTIONS.{at}.mask"),
                conditioning_scale=float(entry.get("conditioning_scale", 1.0)),
                start=float(entry.get("start_percentage", 0.0)),
                end=float(entry.get("end_percentage", 1.0)),
                ip_adapter_index=index,
            )
        )
    return tuple(out)


def _family(config: Mapping[str, Any]) -> str:
    return "SDXL" if is_xl_controlnet(config) else "SD1.5"


def _wrap(controlnet: Any) -> nn.Module:
    """The spec wrapper of a loaded ControlNetModel: SDXL's takes text_embeds / time_ids too."""
    if is_xl_controlnet(controlnet.config):
        xl_residual_layout(controlnet.config)  # SDXL-shaped, or a ValueError that says so
        return XLControlNet(controlnet.eval())
    residual_layout(controlnet.config)  # SD1.5-shaped, or a ValueError that says so
    return SdControlNet(controlnet.eval())


def load_single_file_controlnet(path: str, config_dir: Path, dtype: torch.dtype) -> Any:
    """A ControlNetModel from one .safetensors file and config_dir/config.json. Original key names
    (`control_model.input_hint_block.*`, `zero_convs.*`, ...) go through diffusers' own conversion
    (single_file_utils.convert_controlnet_checkpoint, plus its `label_emb` -> `add_embedding` table for
    SDXL's "text_time" embedding, which that function leaves out); diffusers' names load as they are. Every
    tensor must fit the config (strict load); ValueError says which do not."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
    from safetensors.torch import load_file

    from ember.specs.checkpoint_keys import CONTROLNET_LDM

    config = ControlNetModel.load_config(str(config_dir))
    tensors = {k: v.to(dtype) for k, v in load_file(path).items()}  # safetensors only: never unpickled
    if "controlnet_cond_embedding.conv_in.weight" not in tensors:  # the original layout
        original = {k.removeprefix(CONTROLNET_LDM): v for k, v in tensors.items()}
        converted = convert_controlnet_checkpoint(tensors, config)
        for ours, theirs in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            if theirs in original:
                converted[ours] = original[theirs]
        tensors = {k: v for k, v in converted.items() if v is not None}  # absent originals map to None
    with init_empty_weights(include_buffers=False):
        controlnet = ControlNetModel.from_config(config)
    try:
        controlnet.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # missing / unexpected tensors, or shapes of another architecture
        raise ValueError(" ".join(str(exc).split())[:600]) from None
    return controlnet


def _controlnet_loader(
    variant: str | None, config_dir: Path | None = None, builtin: bool = False
) -> Callable[[str, str | None, torch.dtype], nn.Module]:
    """`config_dir` None: `source` is a diffusers ControlNet directory; else a single .safetensors file
    loaded against config_dir/config.json (`builtin`: our full-size config, picked by the weights' family)."""

    def load(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
        from diffusers import ControlNetModel

        if config_dir is None:
            return _wrap(
                ControlNetModel.from_pretrained(source, revision=revision, dtype=dtype, variant=variant)
            )
        try:
            return _wrap(load_single_file_controlnet(source, config_dir, dtype))
        except ValueError as exc:
            which = (
                f"the built-in {config_dir.name} config (the full-size ControlNet); send its config.json as "
                "config_url"
                if builtin
                else "config_url's config"
            )
            raise ValueError(f"the single-file weights do not fit {which}: {exc}") from None

    return load


def _read_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))


def _misfit(controlnet: Mapping[str, Any], unet: Mapping[str, Any]) -> str | None:
    """Why a ControlNet cannot condition this UNet (its residuals must match the skip connections), or None."""
    if is_xl_controlnet(controlnet) != is_xl_controlnet(unet):
        return (
            f"an {_family(controlnet)} ControlNet cannot condition an {_family(unet)} base model; use an "
            f"{_family(unet)} ControlNet (or an {_family(controlnet)} base)"
        )
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels")
    if is_xl_controlnet(unet):  # the text_time embedding reads the same text_embeds / time_ids widths
        keys += ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
    for key in keys:
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

    def config_of(self, ref: ControlNetRef) -> tuple[dict[str, Any], Path | None, bool]:
        """The ControlNet's config, and for a single file the directory holding it and whether that is a
        built-in one (picked by the weights' family from their tensor names; nothing is loaded)."""
        if not ref.single_file:
            return _read_config(ref.source), None, False
        if ref.config is not None:  # config_url's, written once by content
            directory = (
                self.settings.export_dir / CONFIGS_DIR / hashlib.sha256(ref.config.encode()).hexdigest()
            )
            if not (directory / "config.json").is_file():
                directory.mkdir(parents=True, exist_ok=True)
                staging = directory / f".config-{os.getpid()}.json"
                staging.write_text(ref.config, encoding="utf-8")
                os.replace(staging, directory / "config.json")
            return json.loads(ref.config), directory, False
        from ember.pipeline.base_models import checkpoint_shapes

        directory = (
            BUILTIN_CONFIGS / f"controlnet-{controlnet_file_family(checkpoint_shapes(Path(ref.source)))}"
        )
        return _read_config(directory), directory, True

    def runner(self, ref: ControlNetRef, log: Callable[[str], None]) -> tuple[Runner, dict[str, Any]]:
        """The ControlNet's runner and config, loading it on first use (the least recently used leaves)."""
        hit = self._runners.get(ref)
        if hit is not None:
            self._runners.move_to_end(ref)
            return hit
        from ember.runtime.torch_runner import TorchRunner

        if ref.single_file and ref.variant is not None:
            raise ValueError(
                "`variant` picks a weights file in a ControlNet directory; this path is a single file"
            )
        log(f"loading ControlNet {ref.source} (first use; later requests are warm)")
        start = time.perf_counter()
        config, config_dir, builtin = self.config_of(ref)
        family_spec = XL_CONTROLNET if is_xl_controlnet(config) else CONTROLNET
        spec = dataclasses.replace(family_spec, load=_controlnet_loader(ref.variant, config_dir, builtin))
        runner = TorchRunner(spec, ref.source, None, self.settings.device, torch_dtype(self.settings.dtype))
        while len(self._runners) >= self.capacity:
            evicted, _ = self._runners.popitem(last=False)
            log(f"unloading ControlNet {evicted.source} (EMBER_LORA_MAX_CONTROLNETS={self.capacity})")
        hit = self._runners[ref] = (runner, config)
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
        dtype = torch_dtype(self.settings.dtype)
        if is_xl_controlnet(config):  # SDXL: residuals of 3 blocks x 2 layers, text_time inputs on both sides
            xl_residual_layout(config)  # ValueError unless SDXL-shaped
            module: nn.Module = XLControlledUNet(unet)
            spec, controlled = (
                XL_CONTROLLED_UNET,
                Controlled(config, XL_RESIDUAL_NAMES, xl_residual_layout, ("text_embeds", "time_ids")),
            )
        else:
            residual_layout(config)  # ValueError unless SD1.5-shaped
            module, spec, controlled = ControlledUNet(unet), CONTROLLED_UNET, Controlled(config)
        runner = TorchRunner(spec, "", None, self.settings.device, dtype, module=module)
        hit = self._controlled[model] = (runner, controlled)
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
            guess_mode = r.controlnet_guess_mode
            for i, c in enumerate(r.controlnets):
                try:  # the family and shape check reads config.json only; then the network loads
                    config, config_dir, builtin = self.config_of(c.ref)
                    # diffusers: a first ControlNet with global_pool_conditions (shuffle-like ones, whose
                    # residuals are pooled) puts the whole request in guess mode
                    guess_mode = guess_mode or (i == 0 and bool(config.get("global_pool_conditions")))
                    misfit = _misfit(config, unet_config)
                    if misfit is not None and builtin and config_dir is not None:
                        misfit += (
                            f" (the shapes of the built-in {config_dir.name} config, the full-size one, taken "
                            "for a single file without config_url: send the file's config.json as config_url)"
                        )
                    if misfit is None:
                        runner, _ = self.runner(c.ref, lambda message, at=slot.index: log(at, message))
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
                        guess_mode=guess_mode,
                        pooled=bool(config.get("global_pool_conditions")),
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
