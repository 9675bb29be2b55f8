"""Stable Diffusion XL stages shared by every SDXL pipeline (fal-ai/lcm model="sdxl"; fal-ai/lora's SDXL
bases): prompt encoding through both CLIP text encoders, the negative / empty-prompt conditioning, and the
"text_time" added conditions (pooled text_embeds + micro-conditioning time_ids).

Each follows diffusers' StableDiffusionXLPipeline (encode_prompt, _get_add_time_ids) so that, on the same
weights, the UNet sees bit-identical inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ember.pipeline.encode import tokenize
from ember.runtime import Runner

Size = tuple[int, int]  # (height, width) in pixels, diffusers' order for original_size / target_size


@dataclass(frozen=True)
class XLPromptEmbeds:
    """One row per prompt: embeddings (P, 77, D1 + D2) for encoder_hidden_states (both encoders'
    penultimate hidden states, concatenated), pooled (P, P2) for the UNet's text_embeds (the second
    encoder's projected pooled output)."""

    embeddings: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class XLTextEncoders:
    """SDXL's two CLIP text encoders with their tokenizers (the second pads with "!", the first with
    <|endoftext|>: each tokenizer goes with its own encoder)."""

    text_encoder: Runner  # ember.specs.sdxl.TEXT_ENCODER
    tokenizer: PreTrainedTokenizerBase
    text_encoder_2: Runner  # ember.specs.sdxl.TEXT_ENCODER_2
    tokenizer_2: PreTrainedTokenizerBase

    def encode(self, prompts: list[str], prompts_2: list[str] | None = None) -> XLPromptEmbeds:
        """diffusers' encode_prompt for one list of prompts (clip_skip None): `prompts_2` goes to the second
        encoder (diffusers' prompt_2; None = the same prompts)."""
        first = self.text_encoder.run({"input_ids": tokenize(self.tokenizer, prompts)})
        second = self.text_encoder_2.run({"input_ids": tokenize(self.tokenizer_2, prompts_2 or prompts)})
        embeddings = torch.cat([first["text_embeddings"], second["text_embeddings"]], dim=-1)
        return XLPromptEmbeds(embeddings=embeddings, pooled=second["text_embeds"])

    def encode_negative(
        self, negative_prompts: Sequence[str | None], like: XLPromptEmbeds, force_zeros_for_empty_prompt: bool
    ) -> XLPromptEmbeds:
        """The unconditional branch of classifier-free guidance, one row per prompt of `like`.

        As diffusers: a negative prompt given as None on a model whose config sets
        force_zeros_for_empty_prompt (SDXL base: true) conditions on zeros (embeddings and pooled); any
        other (None included, otherwise) is encoded, None as "". Only the rows that need it are encoded.
        """
        if len(negative_prompts) != like.embeddings.shape[0]:
            raise ValueError(
                f"{len(negative_prompts)} negative prompts for {like.embeddings.shape[0]} prompts"
            )
        embeddings, pooled = torch.zeros_like(like.embeddings), torch.zeros_like(like.pooled)
        rows = [
            i for i, p in enumerate(negative_prompts) if p is not None or not force_zeros_for_empty_prompt
        ]
        if rows:
            encoded = self.encode([negative_prompts[i] or "" for i in rows])
            embeddings[rows], pooled[rows] = encoded.embeddings, encoded.pooled
        return XLPromptEmbeds(embeddings=embeddings, pooled=pooled)


def penultimate_inert(num_hidden_layers: int) -> tuple[str, ...]:
    """Weight-name prefixes of a CLIP text encoder read at hidden_states[-2] (SDXL's first encoder) that never
    reach that output: its last layer and final norm (the ONNX export prunes them). For LoraState's `inert`;
    both transformers layouts (5.x flat, 4.x under `text_model.`)."""
    dead = (f"encoder.layers.{num_hidden_layers - 1}.", "final_layer_norm.")
    return (*dead, *(f"text_model.{prefix}" for prefix in dead))


def add_time_ids(
    original_size: Size,
    target_size: Size,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    aesthetic_score: float | None = None,
) -> torch.Tensor:
    """(1, 6) float32 micro-conditioning: original (h, w), crop top-left (y, x), target (h, w), as diffusers'
    _get_add_time_ids. Models whose config requires an aesthetic score (the SDXL refiner) take (1, 5):
    original size, crop, score. Text-to-image and the base's img2img / inpainting pass
    original_size = target_size = the output size."""
    tail = (aesthetic_score,) if aesthetic_score is not None else target_size
    return torch.tensor([[*original_size, *crops_coords_top_left, *tail]], dtype=torch.float32)


def check_added_conditions(unet_config: Mapping[str, Any], pooled_dim: int, num_time_ids: int = 6) -> None:
    """The UNet's "text_time" embedding must take num_time_ids x addition_time_embed_dim + pooled_dim
    features (diffusers checks the same in _get_add_time_ids); a mismatch means the text encoder and UNet
    come from different models (e.g. a refiner UNet on a base, or a non-XL UNet)."""
    if unet_config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"the UNet's addition_embed_type is {unet_config.get('addition_embed_type')!r}, not 'text_time': "
            "not an SDXL UNet"
        )
    expected = int(unet_config["projection_class_embeddings_input_dim"])
    got = num_time_ids * int(unet_config["addition_time_embed_dim"]) + pooled_dim
    if got != expected:
        raise ValueError(
            f"the UNet expects {expected} added-condition features but {num_time_ids} time ids x "
            f"{unet_config['addition_time_embed_dim']} + a pooled text embedding of {pooled_dim} give {got}: "
            "the text_encoder_2 and unet components do not belong together"
        )
