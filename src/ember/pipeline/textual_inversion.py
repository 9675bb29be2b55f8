"""Textual inversion (fal-ai/lora `embeddings`), as diffusers' load_textual_inversion + maybe_convert_prompt
define it, without touching the shared model:

- the tokens go into a copy of the model's tokenizer (cached per embedding set: a copy costs ~0.3 s), named
  as diffusers names them (a multi-vector token T adds T, T_1, ..., T_{n-1});
- the vectors become rows of the extended text encoder's `extra_embeddings` input
  (ember.specs.lora_text): tokenizer id base_size + j is fed as vocab_size + j and picks row j;
- a multi-vector token in a prompt expands to its n tokens (`Vocabulary.expand`).

Requests without embeddings keep the base tokenizer and the plain text encoder.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ember.endpoints.lora.embeddings import (
    EmbeddingLayout,
    check_tokens,
    embedding_layout,
    family_mismatch,
    token_vectors,
)
from ember.specs.lora_text import EXTRA_TOKENS

_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file bound to its tokens: `tokens` maps each prompt token to rows of `vectors`."""

    digest: str  # sha256 of the file
    tokens: tuple[tuple[str, tuple[int, ...]], ...]
    vectors: torch.Tensor  # (n, D) float32; SDXL files: clip_l's, for the first text encoder
    vectors_2: torch.Tensor | None = None  # SDXL files: clip_g's (n, D2), for the second; else None

    @property
    def key(self) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
        return (self.digest, self.tokens)

    @property
    def layout(self) -> EmbeddingLayout:
        n, width = self.vectors.shape
        if self.vectors_2 is None:
            return EmbeddingLayout("vectors", n, width)
        return EmbeddingLayout("clip_l", n, width, "clip_g", self.vectors_2.shape[1])

    def for_encoder(self, index: int) -> Embedding:
        """An SDXL embedding's rows for text encoder `index` (0: clip_l, 1: clip_g), as a one-encoder
        Embedding with the same tokens (diffusers loads each tensor into its own encoder and tokenizer)."""
        vectors = self.vectors if index == 0 else self.vectors_2
        if vectors is None:
            raise ValueError("not an SDXL embedding: it holds vectors for one text encoder only")
        return Embedding(self.digest, self.tokens, vectors)


def parse_embedding(state: Mapping[str, torch.Tensor], digest: str, tokens: Sequence[str]) -> Embedding:
    """An Embedding from a loaded safetensors state dict; ValueError says what is wrong with it."""
    check_tokens(tokens)
    layout = embedding_layout(
        {name: (_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for name, t in state.items()}
    )
    vectors = state[layout.key].float().reshape(layout.vectors, layout.width)
    vectors_2 = None
    if layout.key_2 is not None:  # SDXL: {"clip_l": (n, D1), "clip_g": (n, D2)}
        vectors_2 = state[layout.key_2].float().reshape(layout.vectors, layout.width_2)
    mapping = tuple((token, tuple(rows)) for token, rows in token_vectors(tokens, layout.vectors))
    return Embedding(digest, mapping, vectors, vectors_2)


def check_families(embeddings: Sequence[Embedding], xl_base: bool) -> None:
    """ValueError naming embeddings[i] for an embedding made for the other model family."""
    for i, embedding in enumerate(embeddings):
        mismatch = family_mismatch(embedding.layout, xl_base)
        if mismatch:
            raise ValueError(f"embeddings[{i}]: {mismatch}")


def load_embedding(blob: bytes, tokens: Sequence[str]) -> Embedding:
    from safetensors.torch import load

    return parse_embedding(load(blob), hashlib.sha256(blob).hexdigest(), tokens)


def embeddings_from_options(
    entries: Sequence[Mapping[str, Any]], blobs: Sequence[bytes]
) -> tuple[Embedding, ...]:
    """OPTIONS.embeddings ([{"file": index into LORA_FILES, "tokens": [...]}]) as Embeddings; ValueError
    names the entry."""
    out = []
    for i, entry in enumerate(entries):
        index = int(entry["file"])
        if not 0 <= index < len(blobs):
            raise ValueError(
                f"OPTIONS.embeddings[{i}].file = {index}, but LORA_FILES holds {len(blobs)} file(s)"
            )
        try:
            out.append(load_embedding(bytes(blobs[index]), list(entry.get("tokens") or ["<s0>", "<s1>"])))
        except Exception as exc:
            raise ValueError(f"embeddings[{i}]: not a usable embedding file: {exc}") from exc
    return tuple(out)


@dataclass
class Vocabulary:
    """The tokenizer a request's prompts go through and what its added tokens mean to the text encoder."""

    tokenizer: PreTrainedTokenizerBase
    base_size: int  # len() of the model's own tokenizer: ids from here on are added tokens
    extra: torch.Tensor | None = None  # (EXTRA_TOKENS, D): row j is the vector of id base_size + j
    # id of a multi-vector token -> the ids of its n tokens (diffusers' maybe_convert_prompt, by id)
    expansions: dict[int, list[int]] = field(default_factory=dict)

    @property
    def has_added_tokens(self) -> bool:
        return self.extra is not None

    def expand(self, ids: Sequence[int]) -> list[int]:
        return [j for i in ids for j in self.expansions.get(i, (i,))]

    def model_ids(self, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Tokenizer ids (B, S) -> the text encoder's: added tokens index `extra` past its own table."""
        return torch.where(ids >= self.base_size, ids - self.base_size + vocab_size, ids)


def build_vocabulary(
    tokenizer: PreTrainedTokenizerBase, embeddings: Sequence[Embedding], width: int
) -> Vocabulary:
    """A tokenizer copy holding every embedding's tokens and the (EXTRA_TOKENS, width) rows behind them."""
    base_size = len(tokenizer)
    if not embeddings:
        return Vocabulary(tokenizer, base_size)
    check_families(embeddings, xl_base=False)  # SDXL bases pass each encoder's rows (Embedding.for_encoder)
    vocab = tokenizer.get_vocab()
    names: list[tuple[str, torch.Tensor]] = []  # added token -> its vector, in id order
    groups: list[tuple[str, list[str]]] = []  # trigger token -> the tokens it expands to
    for i, embedding in enumerate(embeddings):
        if embedding.vectors.shape[1] != width:
            raise ValueError(
                f"embeddings[{i}]: vectors of width {embedding.vectors.shape[1]}, but this base model's text "
                f"encoder takes {width} (an embedding trained for another model family)"
            )
        for token, rows in embedding.tokens:
            expanded = [token] + [f"{token}_{k}" for k in range(1, len(rows))]
            for name in expanded:
                if name in vocab or any(name == n for n, _ in names):
                    raise ValueError(
                        f"embeddings[{i}].tokens: {name!r} is already a token of this model or of another "
                        "embedding; pick another token, e.g. '<my-style>'"
                    )
            names += [(name, embedding.vectors[row]) for name, row in zip(expanded, rows, strict=True)]
            groups.append((token, expanded))
    if len(names) > EXTRA_TOKENS:
        raise ValueError(f"embeddings: {len(names)} vectors in all, at most {EXTRA_TOKENS} per request")
    copied = copy.deepcopy(tokenizer)
    extra = torch.zeros(EXTRA_TOKENS, width)
    for name, vector in names:
        copied.add_tokens(name)
        token_id = copied.convert_tokens_to_ids(name)
        extra[token_id - base_size] = vector
    expansions = {
        copied.convert_tokens_to_ids(token): [copied.convert_tokens_to_ids(n) for n in expanded]
        for token, expanded in groups
        if len(expanded) > 1
    }
    return Vocabulary(copied, base_size, extra, expansions)


class Vocabularies:
    """Vocabulary per embedding set, least recently used leaving first (each holds a tokenizer copy)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, width: int, capacity: int = 8):
        self.tokenizer = tokenizer
        self.width = width
        self._cache: OrderedDict[tuple, Vocabulary] = OrderedDict()
        self._capacity = capacity
        self._plain = Vocabulary(tokenizer, len(tokenizer))

    def get(self, embeddings: Sequence[Embedding]) -> Vocabulary:
        if not embeddings:
            return self._plain
        key = tuple(e.key for e in embeddings)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = build_vocabulary(self.tokenizer, embeddings, self.width)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return found
