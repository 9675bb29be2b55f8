"""LoRA weights applied to running networks without re-exporting them: W = W0 + sum_i s_i * (alpha_i / r_i) B_i A_i.

A LoRA file is parsed once into per-weight deltas (keyed by the network component's own state-dict
names); a *set* of (LoRA, scale) pairs is merged from the pristine base weights in float32 and pushed
with `Runner.refit`. The base copy of every weight a LoRA ever touched is kept, so switching sets
(A -> B -> A) restores the base exactly and gives A's weights bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ember.runtime import Runner

# LoRA state-dict prefixes (diffusers' format) -> the runner holding that component.
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder"}


@dataclass(frozen=True)
class LoraFile:
    """One parsed LoRA: for each component, weight name -> low-rank factors (up (out, r), down (r, in...))."""

    digest: str
    factors: dict[
        str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    ]  # comp -> weight -> (B, A, alpha/r)


def parse_lora(state_dict: dict[str, torch.Tensor], digest: str) -> LoraFile:
    """Parse a LoRA safetensors state dict in any format diffusers reads (its own, PEFT, kohya / A1111):
    diffusers' `lora_state_dict` normalizes the names first. ValueError when nothing is a LoRA weight."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    normalized, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state_dict))
    alphas = alphas or {}
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {c: {} for c in COMPONENTS}
    for key, down in normalized.items():
        for down_tag, up_tag in (
            (".lora_A.weight", ".lora_B.weight"),
            (".lora.down.weight", ".lora.up.weight"),
        ):
            if key.endswith(down_tag):
                module = key[: -len(down_tag)]
                up = normalized.get(module + up_tag)
                break
        else:
            continue
        if up is None:
            raise ValueError(f"LoRA weight {key} has no matching up projection")
        component, _, name = module.partition(".")
        if component not in COMPONENTS:
            raise ValueError(f"LoRA weight {key} names no component this pipeline has (unet, text_encoder)")
        rank = down.shape[0]
        alpha = alphas.get(module + ".alpha", alphas.get(module.replace(".", "_") + ".alpha", rank))
        factors[component][name + ".weight"] = (up.float(), down.float(), float(alpha) / rank)
    if not any(factors.values()):
        raise ValueError("the file holds no LoRA weights (expected lora_A/lora_B or lora_down/lora_up pairs)")
    return LoraFile(digest=digest, factors={c: f for c, f in factors.items() if f})


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
    ):
        self.runners = runners
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

    @property
    def current(self) -> tuple[tuple[str, float], ...]:
        return self._current

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
        for lora, _ in loras:
            for component, weights in lora.factors.items():
                if component not in self.runners:
                    problems.append(f"the LoRA changes the {component}, which this model cannot refit")
                    continue
                for name, (up, down, _) in weights.items():
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
        for lora, scale in loras:
            for component, weights in lora.factors.items():
                out = merged.setdefault(component, {})
                for name, (up, down, ratio) in weights.items():
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
