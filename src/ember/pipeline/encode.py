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
