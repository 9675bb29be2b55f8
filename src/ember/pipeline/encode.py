"""Prompt encoding: CLIP tokenization (77 tokens, truncated) and the text encoder network."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ember.runtime import Runner


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> torch.Tensor:
    """(P, 77) int64 ids, padded with <|endoftext|> and truncated like diffusers' encode_prompt."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(
    text_encoder: Runner, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> torch.Tensor:
    """(P, 77, D) last hidden states, one row per distinct prompt, in order."""
    return text_encoder.run({"input_ids": tokenize(tokenizer, prompts)})["text_embeddings"]


def encode_prompts_pooled(
    text_encoder: Runner, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 77, D) last hidden states and (P, 1, P') projected pooled embeddings, one row per distinct prompt,
    for text encoders that take the attention mask (Stable Cascade's CLIPTextModelWithProjection: diffusers
    passes the mask, which changes the hidden states at padded positions)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    out = text_encoder.run({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
    return out["text_embeddings"], out["text_embeds_pooled"]
