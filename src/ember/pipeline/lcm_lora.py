"""fal-ai/lcm `lora_url` + `lora_scale`: one LoRA fused into the LCM model for the requests that name it.

fal documents `lora_scale` only as "the scale of the lora" (default 1, no bounds); fal-ai/lora documents its
LoRA `scale` as scaling "the LoRA weight before merging it with the base model". Both are read as the fuse
scale of diffusers' `fuse_lora(lora_scale=...)`: W = W0 + lora_scale * (alpha / r) * B A, on the UNet and,
when the file has weights for them, the text encoder(s) (`cross_attention_kwargs={"scale": s}` is the same
maths unfused). model="sdxl" fuses into both XL text encoders (text_encoder_2: kohya's lora_te2_) and the
XL UNet, as StableDiffusionXLPipeline.load_lora_weights + fuse_lora does. The weights are swapped through
`Runner.refit` by ember.pipeline.loras.LoraState, whatever the runtime: merged sets are cached, and the base
is restored exactly for requests without LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ember.pipeline.loras import LoraFile, LoraState
from ember.pipeline.requests import Text2ImageRequest
from ember.runtime import RefitNotSupportedError, Runner

# Model variants whose LoRAs parse_lora reads (SD1.5: unet + text_encoder; SDXL: + text_encoder_2).
LORA_MODELS = ("sdv1-5", "sdxl")


class LcmLoras:
    """The LoRA state of one LCM pipeline's text encoder and UNet, created on the first LoRA request (its
    base copies cost memory only for the weights a LoRA touches)."""

    def __init__(
        self,
        text_encoder: Runner,
        unet: Runner,
        model: str,
        text_encoder_2: Runner | None = None,
        inert: Mapping[str, tuple[str, ...]] | None = None,
    ):
        """`text_encoder_2`: SDXL's second encoder; `inert`: weight-name prefixes that reach no output
        (ember.pipeline.loras.LoraState)."""
        self._runners = {"text_encoder": text_encoder, "unet": unet}
        if text_encoder_2 is not None:
            self._runners["text_encoder_2"] = text_encoder_2
        self._inert = inert
        self._model = model
        self._state: LoraState | None = None
        self._unavailable: str | None = None  # why this pipeline's runners cannot refit
        # controlnet_inpaint's UNet taking ControlNet residuals: the same UNet weights in a separate export
        # (ember.pipeline.lcm_controlnet), so the LoRA's UNet part is fused into it too, with its own state
        self._controlled: LoraState | None = None

    def _loaded(self) -> LoraState | None:
        if self._state is None and self._unavailable is None:
            try:
                weights = {name: runner.weights() for name, runner in self._runners.items()}
            except RefitNotSupportedError as exc:
                self._unavailable = str(exc)
                return None
            self._state = LoraState(self._runners, weights, inert=self._inert)
        return self._state

    def problems(self, request: Text2ImageRequest) -> list[str]:
        """Why the request's LoRA cannot be served here; empty without LoRA."""
        if not request.loras:
            return []
        if self._model not in LORA_MODELS:
            return [f"lora_url is served for model {' / '.join(LORA_MODELS)} only, not {self._model!r}"]
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

    def apply_controlled(self, unet: Runner, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Fuse the UNet part of `loras` into controlnet_inpaint's controlled UNet `unet` (empty: its base),
        for a batch that runs it; the text encoder part is already fused by `apply`. Its weights have the
        plain UNet's names and shapes (one UNet, two exports), so problems() checked this one too; a
        pristine copy is kept of each weight a LoRA touched here as well (the two runners hold two copies)."""
        if not loras and self._controlled is None:
            return
        if self._controlled is None or self._controlled.runners["unet"] is not unet:
            self._controlled = LoraState({"unet": unet}, {"unet": unet.weights()})
        unet_only = [(LoraFile(lora.digest, {"unet": lora.factors.get("unet", {})}), s) for lora, s in loras]
        self._controlled.apply(unet_only)
