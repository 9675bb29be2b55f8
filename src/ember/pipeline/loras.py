"""LoRA weights applied to running networks without re-exporting them: W = W0 + sum_i s_i * (alpha_i / r_i) B_i A_i.

A LoRA file is parsed once into per-weight deltas (keyed by the network component's own state-dict
names); a *set* of (LoRA, scale) pairs is merged from the pristine base weights in float32 and pushed
with `Runner.refit`. The base copy of every weight a LoRA ever touched is kept, so switching sets
(A -> B -> A) restores the base exactly and gives A's weights bit for bit.
"""

from __future__ import annotations

import re
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.runtime import Runner

# LoRA state-dict prefixes (diffusers' format) -> the runner holding that component. SD1.5 files name
# unet + text_encoder; SDXL files add text_encoder_2 (the second CLIP, kohya's lora_te2_). Which of these a
# pipeline can refit is LoraState's business: a component it lacks is refused there, by name.
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
# Kohya trains SDXL on the original (SGM/LDM) UNet, whose blocks are numbered flat: input_blocks.N,
# middle_block.N, output_blocks.N. Mapping them to diffusers' down_blocks.b.{resnets,attentions}.l needs the
# UNet's layers_per_block; every SDXL UNet has 2, which parse_lora assumes until LoraState knows the model.
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
SDXL_LAYERS_PER_BLOCK = 2


@dataclass(frozen=True)
class LoraFile:
    """One parsed LoRA: for each component, weight name -> low-rank factors (up (out, r), down (r, in...))."""

    digest: str
    factors: dict[
        str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    ]  # comp -> weight -> (B, A, alpha/r)
    # Kohya SGM block names only: the file as read and the layers_per_block its UNet names were mapped
    # with, so LoraState can map them again for a UNet laid out otherwise (for_layout).
    sgm: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    sgm_layers_per_block: int | None = None

    def for_layout(self, layers_per_block: int) -> LoraFile:
        """This LoRA with its SGM block names mapped for a UNet of `layers_per_block` (itself otherwise)."""
        if self.sgm is None or self.sgm_layers_per_block == layers_per_block:
            return self
        return parse_lora(dict(self.sgm), self.digest, layers_per_block)


def is_sgm_lora(state_dict: Mapping[str, Any]) -> bool:
    """A kohya LoRA naming the UNet in the original SGM blocks (lora_unet_input_blocks_4_1_...)."""
    return any(key.startswith("lora_unet_") and any(b in key for b in _SGM_BLOCKS) for key in state_dict)


def parse_lora(
    state_dict: dict[str, torch.Tensor], digest: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK
) -> LoraFile:
    """Parse a LoRA safetensors state dict in any format diffusers reads (its own, PEFT, kohya / A1111),
    SD1.5 or SDXL: diffusers' SDXL `lora_state_dict` normalizes the names first (it reads both families: the
    SD1.5 one is the same conversion, and kohya's lora_te1_ / lora_te2_ become text_encoder / text_encoder_2).
    Kohya SDXL files in SGM block names (input_blocks.*) are remapped by diffusers' own conversion for a UNet
    of `layers_per_block` (as load_lora_weights does with the pipeline's UNet config); LoraState maps them
    again when its UNet has another layout. ValueError when nothing is a LoRA weight."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    sgm = is_sgm_lora(state_dict)
    unet_config = types.SimpleNamespace(layers_per_block=layers_per_block) if sgm else None
    normalized, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        dict(state_dict), unet_config=unet_config
    )
    alphas = alphas or {}
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {c: {} for c in COMPONENTS}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in normalized.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    for component, part in parts.items():
        # key in the network's own names (`<module>.lora_A.weight`) -> the key lora_state_dict gave
        origin = _peft_names(component, part)
        for key, source in origin.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            if component not in COMPONENTS:
                raise ValueError(
                    f"LoRA weight {component}.{source} names no component a diffusion pipeline has "
                    f"({', '.join(COMPONENTS)})"
                )
            up_source = origin.get(module + ".lora_B.weight")
            if up_source is None:
                raise ValueError(f"LoRA weight {component}.{source} has no matching up projection")
            down, up = part[source], part[up_source]
            rank = down.shape[0]
            alpha = _alpha(alphas, f"{component}.{source}", f"{component}.{module}", rank)
            factors[component][module + ".weight"] = (up.float(), down.float(), float(alpha) / rank)
    if not any(factors.values()):
        raise ValueError("the file holds no LoRA weights (expected lora_A/lora_B or lora_down/lora_up pairs)")
    return LoraFile(
        digest=digest,
        factors={c: f for c, f in factors.items() if f},
        sgm=dict(state_dict) if sgm else None,
        sgm_layers_per_block=layers_per_block if sgm else None,
    )


def _peft_names(component: str, part: dict[str, torch.Tensor]) -> dict[str, str]:
    """A component's keys as lora_state_dict left them -> the same keys in PEFT names on the network's own
    modules (`<module>.lora_A.weight` / `.lora_B.weight`), by the conversions diffusers applies when it
    loads them: kohya / A1111 files come out of lora_state_dict in the old attention-processor names
    (`attn1.processor.to_q_lora.down.weight`, text encoders' `self_attn.to_q_lora.down.weight`), which
    `convert_unet_state_dict_to_peft` / `convert_state_dict_to_diffusers` + `convert_state_dict_to_peft`
    map to `attn1.to_q.lora_A.weight` / `self_attn.q_proj.lora_A.weight`. The conversions only rename, so
    they run on {key: key} and give each new name its source key."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    names: dict = {key: key for key in part}
    try:
        if component == "unet":
            return dict(convert_unet_state_dict_to_peft(names))
        # diffusers infers the old naming from a to_out_lora key only; a file adapting q/k/v alone has none
        old = any("_lora.down." in key or "_lora.up." in key for key in names)
        diffusers_names = convert_state_dict_to_diffusers(
            names, original_type=StateDictType.DIFFUSERS_OLD if old else None
        )
        return dict(convert_state_dict_to_peft(diffusers_names))
    except ValueError:  # a naming diffusers does not infer: taken as PEFT names (others stay unmatched)
        return names


def _alpha(alphas: Mapping[str, float], source: str, module: str, rank: int) -> float:
    """The network alpha of one LoRA module (alpha = rank when the file stores none, diffusers' rule). The
    conversion of kohya files names it after the down key (`<down key>.alpha`); other formats after the
    module (`<module>.alpha`)."""
    for key in (source + ".alpha", module + ".alpha", module.replace(".", "_") + ".alpha"):
        if key in alphas:
            return float(alphas[key])
    return float(rank)


def lora_delta(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B @ A shaped like the base weight: linear (out, in), or conv (out, in, k, k) from (out, r, 1, 1) x (r, in, k, k)."""
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


class LoraState:
    """The LoRA set currently fused into a model's runners, with the base weights to restore.

    Merged weights are cached per set (a few sets: each holds a copy of the weights the set touches).
    """

    def __init__(
        self,
        runners: Mapping[str, Runner],
        base_weights: Mapping[str, Mapping[str, torch.Tensor]],
        max_cached_sets: int = 4,
        inert: Mapping[str, tuple[str, ...]] | None = None,
    ):
        """`inert`: per component, name prefixes of weights that cannot reach the runner's outputs (SDXL's
        first encoder returns the penultimate hidden states: its last layer is dead code, pruned from the
        ONNX export). A LoRA's deltas on them are skipped (fusing them changes no output, as in diffusers)
        rather than refused as weights "this base model does not have"."""
        self.runners = runners
        self._inert = dict(inert or {})
        self._base_state = (
            base_weights  # component -> full state dict (read-only view of the pristine weights)
        )
        self._base: dict[str, dict[str, torch.Tensor]] = {
            c: {} for c in runners
        }  # pristine copies of touched keys
        self._current: tuple[tuple[str, float], ...] = ()
        self._touched: dict[str, set[str]] = {c: set() for c in runners}
        self._merged: OrderedDict[tuple, dict[str, dict[str, torch.Tensor]]] = OrderedDict()
        self._max_cached = max_cached_sets
        self._relaid: dict[str, LoraFile] = {}  # SGM-named LoRAs mapped for this UNet's layout, by digest

    def _laid_out(self, loras: Sequence[tuple[LoraFile, float]]) -> list[tuple[LoraFile, float]]:
        """`loras` with kohya SGM block names mapped for this model's UNet (its layers_per_block, read
        from its weight names: down_blocks.0.resnets.<l>.); other LoRAs as they are."""
        out = []
        for lora, scale in loras:
            if lora.sgm is not None and "unet" in self._base_state:
                if lora.digest not in self._relaid:
                    resnets = re.compile(r"down_blocks\.0\.resnets\.(\d+)\.")
                    found = [int(m.group(1)) for m in map(resnets.match, self._base_state["unet"]) if m]
                    layers = 1 + max(found, default=SDXL_LAYERS_PER_BLOCK - 1)
                    self._relaid[lora.digest] = lora.for_layout(layers)
                lora = self._relaid[lora.digest]
            out.append((lora, scale))
        return out

    def _live(self, component: str, weights: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
        """The LoRA weights of `component` minus the inert ones."""
        inert = self._inert.get(component, ())
        return ((name, value) for name, value in weights.items() if not (inert and name.startswith(inert)))

    @property
    def current(self) -> tuple[tuple[str, float], ...]:
        return self._current

    def pristine(self, component: str) -> dict[str, torch.Tensor]:
        """The pristine copy of every `component` weight a LoRA set has touched; the runner's other weights
        are pristine as they are. Together: the base weights whatever set is fused now (IC-Light builds its
        patched UNet from them, ember.pipeline.ic_light)."""
        return dict(self._base.get(component, {}))

    def _pristine(self, component: str, name: str) -> torch.Tensor:
        if name not in self._base[component]:
            state = self._base_state[component]
            if name not in state:
                raise ValueError(f"the LoRA changes {component}.{name}, which this base model does not have")
            self._base[component][name] = state[name].detach().clone()
        return self._base[component][name]

    def problems(self, loras: Sequence[tuple[LoraFile, float]]) -> list[str]:
        """Why `loras` cannot be fused here (a LoRA made for another model), checked before anything is
        merged or refit: components these runners lack, weight names or shapes the base does not have.
        Reads (and keeps) the pristine copy of each weight named, which the merge needs anyway."""
        problems: list[str] = []
        for lora, _ in self._laid_out(loras):
            for component, weights in lora.factors.items():
                if component not in self.runners:
                    problems.append(f"the LoRA changes the {component}, which this model cannot refit")
                    continue
                for name, (up, down, _) in self._live(component, weights):
                    if name not in self._base_state[component]:
                        problems.append(f"the LoRA changes {component}.{name}, which this base model does not have")
                        break
                    base = self._pristine(component, name)
                    if up.shape[0] != base.shape[0] or up.shape[0] * down[0].numel() != base.numel():
                        problems.append(
                            f"the LoRA's {component}.{name} is {up.shape[0]} x {tuple(down.shape[1:])}, the base "
                            f"weight {tuple(base.shape)} (a LoRA for another model size)"
                        )
                        break
        return problems

    def _merge(self, loras: Sequence[tuple[LoraFile, float]]) -> dict[str, dict[str, torch.Tensor]]:
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for lora, scale in self._laid_out(loras):
            for component, weights in lora.factors.items():
                out = merged.setdefault(component, {})
                for name, (up, down, ratio) in self._live(component, weights):
                    base = self._pristine(component, name)
                    if name not in out:
                        out[name] = base.float().clone()
                    delta = lora_delta(up, down, base.shape)
                    out[name] += (scale * ratio) * delta
        return {c: {n: w.to(self._pristine(c, n).dtype) for n, w in ws.items()} for c, ws in merged.items()}

    def apply(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Make `loras` (in order, with scales) the fused set; the empty set restores the base model."""
        key = tuple((lora.digest, float(scale)) for lora, scale in loras)
        if key == self._current:
            return
        merged = self._merged.get(key)
        if merged is None:
            merged = self._merge(loras)
            self._merged[key] = merged
            while len(self._merged) > self._max_cached:
                self._merged.popitem(last=False)
        else:
            self._merged.move_to_end(key)
        for component, runner in self.runners.items():
            new = merged.get(component, {})
            # Weights the previous set changed and this one does not: back to the pristine copy.
            restore = {n: self._base[component][n] for n in self._touched[component] - set(new)}
            if restore or new:
                runner.refit({**restore, **new})
            self._touched[component] = set(new)
        self._current = key
