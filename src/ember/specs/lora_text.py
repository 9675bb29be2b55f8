"""The extended CLIP text encoder of fal-ai/lora: the network behind textual-inversion `embeddings` and
compel's `prompt_weighting`, beside the plain TEXT_ENCODER of ember.specs.lora that the common path keeps.

It differs from the plain one in two inputs:
- `extra_embeddings` (E, D): token embeddings that are not in the model's table. An id >= vocab_size in
  `input_ids` picks row (id - vocab_size) of it, so a request's textual inversions ride along as an input
  instead of being written into the weights: no per-request refit, nothing shared is mutated, and the same
  graph runs on torch, ONNX Runtime and TensorRT. E is fixed (EXTRA_TOKENS, zero-padded) so engines keep
  one profile.
- `attention_mask` (B, S): compel masks the keys of down-weighted fragments ((word)0.5, word-).

On the torch runtime it wraps the very CLIPTextModel instance of the plain runner (`ExtendedTextEncoder`
over `ClipSkipTextEncoder.text_encoder`), so LoRA refits reach both and no weight is held twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextModel
from transformers.masking_utils import create_causal_mask

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.lora import CLIP_SKIPS, _load_text_encoder, _text_skip_dims
from ember.specs.sd15 import _image_dims, _sample

# Rows of `extra_embeddings`: the most textual-inversion vectors one request may bring (a multi-vector
# embedding longer than a 75-token window could never fit in a prompt anyway).
EXTRA_TOKENS = 128


class ExtendedTextEncoder(nn.Module):
    """input_ids (B, S) int64, attention_mask (B, S) int64, extra_embeddings (E, D) -> (B, 3, S, D): the
    hidden states of ClipSkipTextEncoder (clip_skip 0, 1, 2, each through the final layer norm).

    CLIPTextModel.forward takes no `inputs_embeds`, so this runs its three parts itself: the embeddings
    module (token + position), the causal-and-padding mask (transformers' create_causal_mask, as
    CLIPTextModel builds it), then each encoder layer with is_causal=True. tests/pipeline/
    test_lora_text_features.py checks it against CLIPTextModel(input_ids, attention_mask)."""

    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder  # the only child: Runner.weights()/refit() address it
        self.config = text_encoder.config.to_dict()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra_embeddings: torch.Tensor
    ) -> torch.Tensor:
        model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4.x nests it
        states = clip_hidden_states(self.text_encoder, input_ids, attention_mask, extra_embeddings)
        norm = model.final_layer_norm
        return torch.stack([norm(states[-(skip + 1)]) for skip in range(CLIP_SKIPS)], dim=1)


def clip_hidden_states(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    extra_embeddings: torch.Tensor,
) -> list[torch.Tensor]:
    """CLIPTextModel's hidden_states (each (B, S, D); [0] the embeddings output, then one per layer, no
    final layer norm) for ids that may pick rows of `extra_embeddings` (id >= vocab_size) and a padding
    mask. Shared by ExtendedTextEncoder and SDXL's (ember.specs.lora_xl_text)."""
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests it
    table = model.embeddings.token_embedding
    vocab = table.num_embeddings
    extra = input_ids >= vocab  # (B, S)
    own = table(input_ids.clamp(max=vocab - 1))  # (B, S, D)
    added = nn.functional.embedding((input_ids - vocab).clamp(min=0), extra_embeddings.to(own.dtype))
    hidden = model.embeddings(inputs_embeds=torch.where(extra.unsqueeze(-1), added, own))
    mask = create_causal_mask(
        config=text_encoder.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
    )
    states = [hidden]  # hidden_states[0] is the embeddings output, then one per layer
    for layer in model.encoder.layers:
        hidden = layer(hidden, mask, is_causal=True)
        states.append(hidden)
    return states


def _load(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    return ExtendedTextEncoder(_load_text_encoder(source, revision, dtype).text_encoder)


def _dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {**_text_skip_dims(config), "extra_tokens": EXTRA_TOKENS}


def _sample_inputs(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if spec.name == "attention_mask":
        # Key 0 (<|startoftext|>) always attended, as compel never masks it; some later keys masked out.
        mask = (torch.rand(shape, generator=generator) > 0.3).to(spec.dtype)
        mask[:, 0] = 1
        return mask
    return _sample(spec, shape, generator)


F32, I64 = torch.float32, torch.int64

TEXT_ENCODER_EXT = NetworkSpec(
    name="text_encoder_ext",
    subfolder="text_encoder",
    version=1,
    inputs=(
        TensorSpec("input_ids", I64, ("batch", "sequence")),
        TensorSpec("attention_mask", I64, ("batch", "sequence")),
        TensorSpec("extra_embeddings", F32, ("extra_tokens", "hidden")),
    ),
    outputs=(TensorSpec("hidden_states", F32, ("batch", "skips", "sequence", "hidden")),),
    load=_load,
    static_dims=_dims,
    image_dims=_image_dims,
    sample=_sample_inputs,
)
