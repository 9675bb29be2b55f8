"""Prompt encoding with T5 (PixArt-Σ): up to 300 tokens, padded, with the attention mask kept.

As diffusers' PixArtSigmaPipeline.encode_prompt with max_sequence_length=300: pad to exactly 300 tokens,
truncate longer prompts (keeping the closing </s>), and pass the mask both to T5 and, later, to the DiT's
cross-attention, so padding tokens change nothing. clean_caption (diffusers' default True, which needs
bs4 + ftfy) is not applied: prompts are tokenized as given; see pixart_sigma.py.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ember.runtime import Runner

MAX_SEQUENCE_LENGTH = 300


def tokenize_t5(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int = MAX_SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, max_length) int64 ids and (P, max_length) int64 mask (1 = token, 0 = padding)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return tokens.input_ids, tokens.attention_mask


def encode_t5(
    text_encoder: Runner,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_length: int = MAX_SEQUENCE_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, L, D) last hidden states and their (P, L) mask, one row per distinct prompt, in order."""
    ids, mask = tokenize_t5(tokenizer, prompts, max_length)
    embeddings = text_encoder.run({"input_ids": ids, "attention_mask": mask})["text_embeddings"]
    return embeddings, mask.to(embeddings.device)
