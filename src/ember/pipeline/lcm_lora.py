"""fal-ai/lcm `lora_url` + `lora_scale`: one LoRA fused into the LCM model for the requests that name it.

fal documents `lora_scale` only as "the scale of the lora" (default 1, no bounds); fal-ai/lora documents its
LoRA `scale` as scaling "the LoRA weight before merging it with the base model". Both are read as the fuse
scale of diffusers' `fuse_lora(lora_scale=...)`: W = W0 + lora_scale * (alpha / r) * B A, on the UNet and,
when the file has weights for it, the text encoder (`cross_attention_kwargs={"scale": s}` is the same maths
unfused). The weights are swapped through `Runner.refit` by ember.pipeline.loras.LoraState, whatever the
runtime: merged sets are cached, and the base is restored exactly for requests without LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ember.pipeline.loras import LoraFile, LoraState
from ember.pipeline.requests import Text2ImageRequest
from ember.runtime import RefitNotSupportedError, Runner

# Model variants whose LoRAs parse_lora reads (SD1.5 names: unet + text_encoder).
LORA_MODELS = ("sdv1-5",)
_WITH_CONTROLNET = (
    "lora_url with controlnet_inpaint is not supported yet (the ControlNet-steered UNet is another network, "
    "which the LoRA is not fused into)"
)


class LcmLoras:
    """The LoRA state of one LCM pipeline's text encoder and UNet, created on the first LoRA request (its
    base copies cost memory only for the weights a LoRA touches)."""

    def __init__(self, text_encoder: Runner, unet: Runner, model: str):
        self._runners = {"text_encoder": text_encoder, "unet": unet}
        self._model = model
        self._state: LoraState | None = None
        self._unavailable: str | None = None  # why this pipeline's runners cannot refit

    def _loaded(self) -> LoraState | None:
        if self._state is None and self._unavailable is None:
            try:
                weights = {name: runner.weights() for name, runner in self._runners.items()}
            except RefitNotSupportedError as exc:
                self._unavailable = str(exc)
                return None
            self._state = LoraState(self._runners, weights)
        return self._state

    def problems(self, request: Text2ImageRequest) -> list[str]:
        """Why the request's LoRA cannot be served here; empty without LoRA."""
        if not request.loras:
            return []
        if self._model not in LORA_MODELS:
            return [f"lora_url is served for model {' / '.join(LORA_MODELS)} only, not {self._model!r}"]
        if request.controlnet_inpaint:
            return [_WITH_CONTROLNET]
        if not all(math.isfinite(scale) for _, scale in request.loras):
            return ["lora_scale must be a finite number"]
        state = self._loaded()
        if state is None:
            return [f"lora_url: {self._unavailable}"]
        return [f"lora_url: {problem}" for problem in state.problems(request.loras)]

    def apply(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Fuse `loras` (the batch's shared set; empty: the base). A no-op while no LoRA was ever fused."""
        if not loras and self._state is None:
            return
        state = self._loaded()
        if state is None:  # problems() refused every LoRA request already
            raise RuntimeError(f"LoRA requested on runners that cannot refit: {self._unavailable}")
        state.apply(loras)
