"""SDXL's two extended CLIP text encoders (fal-ai/lora `embeddings` and `prompt_weighting` on SDXL bases),
beside the plain clip-skip encoders of ember.specs.lora_xl that the common path keeps.

As SD1.5's TEXT_ENCODER_EXT (ember.specs.lora_text): an id >= vocab_size in `input_ids` picks row
(id - vocab_size) of `extra_embeddings`, so a request's textual inversions ride along as an input and
nothing shared is mutated; `attention_mask` carries compel's masked (down-weighted) keys. The outputs are
the plain SDXL encoders': hidden_states[-2], [-3], [-4] (fal's clip_skip 0, 1, 2) without the final layer
norm, as diffusers' StableDiffusionXLPipeline.encode_prompt reads them, and for the second encoder the
projected pooled `text_embeds`, taken where CLIPTextModel takes it (the first <|endoftext|>; the highest id
for configs with the legacy eos_token_id 2, where an added token's id wins, as it does in diffusers after
load_textual_inversion: ids keep their order, so the position is the same).

On the torch runtime they wrap the very CLIPTextModel(WithProjection) of the plain runners, so LoRA refits
reach both and no weight is held twice; on onnxruntime each is an export of its own in the base model's
artifact directory (ember.pipeline.xl_text_conditioning.extended_xl_text_encoder), refit with the plain one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.lora_text import EXTRA_TOKENS, _sample_inputs, clip_hidden_states
from ember.specs.lora_xl import CLIP_SKIPS, _load_text_encoder, _load_text_encoder_2, _text_dims
from ember.specs.sd15 import _image_dims


def pooled_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) the position CLIPTextModel pools at: the first eos_token_id, or with the legacy config value 2
    the highest id (transformers' CLIPTextTransformer)."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class ExtendedXLTextEncoder(nn.Module):
    """input_ids (B, S) int64, attention_mask (B, S) int64, extra_embeddings (E, D) -> hidden_states
    (B, 3, S, D): hidden_states[-(skip + 2)] for skip 0, 1, 2, no final layer norm (SDXL's first encoder).
    With a CLIPTextModelWithProjection (the second), also text_embeds (B, P)."""

    def __init__(self, text_encoder: CLIPTextModel | CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder = text_encoder  # the only child: Runner.weights()/refit() address it
        self.config = text_encoder.config.to_dict()
        self.projected = hasattr(text_encoder, "text_projection")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra_embeddings: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        states = clip_hidden_states(self.text_encoder, input_ids, attention_mask, extra_embeddings)
        hidden = torch.stack([states[-(skip + 2)] for skip in range(CLIP_SKIPS)], dim=1)
        if not self.projected:
            return hidden
        model = self.text_encoder.text_model
        last = model.final_layer_norm(states[-1])  # (B, S, D)
        rows = torch.arange(last.shape[0], device=last.device)
        pooled = last[rows, pooled_positions(input_ids, model.eos_token_id).to(last.device)]
        return hidden, self.text_encoder.text_projection(pooled)


def _load(loader: Any, source: str, revision: str | None, dtype: torch.dtype, variant: str | None = None):
    return ExtendedXLTextEncoder(loader(source, revision, dtype, variant).text_encoder)


def _dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {**_text_dims(config), "extra_tokens": EXTRA_TOKENS}


F32, I64 = torch.float32, torch.int64
_INPUTS = (
    TensorSpec("input_ids", I64, ("batch", "sequence")),
    TensorSpec("attention_mask", I64, ("batch", "sequence")),
    TensorSpec("extra_embeddings", F32, ("extra_tokens", "hidden")),
)

TEXT_ENCODER_XL_EXT = NetworkSpec(
    name="text_encoder_xl_ext",
    subfolder="text_encoder",
    version=1,
    inputs=_INPUTS,
    outputs=(TensorSpec("hidden_states", F32, ("batch", "skips", "sequence", "hidden")),),
    load=functools.partial(_load, _load_text_encoder),
    static_dims=_dims,
    image_dims=_image_dims,
    sample=_sample_inputs,
)

TEXT_ENCODER_2_XL_EXT = NetworkSpec(
    name="text_encoder_2_xl_ext",
    subfolder="text_encoder_2",
    version=1,
    inputs=_INPUTS,
    outputs=(
        TensorSpec("hidden_states", F32, ("batch", "skips", "sequence", "hidden")),
        TensorSpec("text_embeds", F32, ("batch", "projection")),
    ),
    load=functools.partial(_load, _load_text_encoder_2),
    static_dims=_dims,
    image_dims=_image_dims,
    sample=_sample_inputs,
)
