"""PyTorch eager: the reference, and the GPU path where no engine is built (fp16/bf16, SDPA attention)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ember.runtime.base import Runner
from ember.specs.base import NetworkSpec


class TorchRunner(Runner):
    """Loads the spec's wrapper module from the diffusers source (HF id or directory) with `from_pretrained`."""

    def __init__(self, spec: NetworkSpec, source: str, revision: str | None, device: str, dtype: torch.dtype):
        self.name = spec.name
        self.device = torch.device(device)
        self._spec = spec
        self._dtype = dtype
        # Attention runs through torch's scaled_dot_product_attention: diffusers' default processor, and
        # attn_implementation="sdpa" for CLIP (set in the spec's loader).
        self._module = spec.load(source, revision, dtype).to(self.device).eval()

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = []
        for t in self._spec.inputs:
            value = feeds[t.name].to(self.device)
            args.append(value.to(self._dtype) if value.is_floating_point() else value.to(t.dtype))
        with torch.inference_mode():
            out = self._module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {
            t.name: (value.float() if value.is_floating_point() else value)
            for t, value in zip(self._spec.outputs, outs, strict=True)
        }

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy `weights` (the diffusers component's state-dict names, e.g. fused LoRA deltas) in place."""
        (component,) = self._module.children()  # each spec wrapper holds exactly one diffusers module
        state = component.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise KeyError(
                f"{self.name} has no weights named {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
        with torch.no_grad():
            for key, value in weights.items():
                if state[key].shape != value.shape:
                    raise ValueError(
                        f"{self.name}.{key}: shape {tuple(value.shape)} != {tuple(state[key].shape)}"
                    )
                state[key].copy_(value)
