"""Prompt embeddings for fal-ai/lora, by the cheapest path that serves the request:

1. plain: no embeddings, no prompt_weighting. The plain text encoder on ids truncated to 77 tokens, as
   diffusers' encode_prompt. This is the common path and it is left exactly as it was.
2. textual inversion without weighting: the request's tokenizer copy (ember.pipeline.textual_inversion),
   multi-vector tokens expanded, then truncated to 77 like diffusers; the extended text encoder
   (ember.specs.lora_text) feeds the added tokens' vectors.
3. prompt_weighting (with or without embeddings): compel on the extended text encoder
   (ember.pipeline.prompt_weighting), prompts of more than 75 tokens in several windows.

`encode` returns (P, S, D) for the P prompts given; S is 77 except for long weighted prompts (77 * windows).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ember.pipeline.encode import tokenize
from ember.pipeline.guided_denoise import GuidedSlot
from ember.pipeline.prompt_weighting import check_length, weighted_embeddings
from ember.pipeline.textual_inversion import Embedding, Vocabularies, Vocabulary
from ember.runtime import Runner
from ember.settings import Settings
from ember.specs.lora import _load_text_encoder
from ember.specs.lora_text import TEXT_ENCODER_EXT, ExtendedTextEncoder


def extended_text_encoder(text_encoder: Runner, settings: Settings, ref: Any) -> Runner:
    """TEXT_ENCODER_EXT for a base model whose plain text encoder is `text_encoder`.

    torch: a wrapper over the plain runner's own CLIPTextModel, so LoRA refits reach both and no weight is
    held twice. onnxruntime: its own export, added to the base model's artifact directory on first use
    (ember.pipeline.base_models.onnx_artifacts)."""
    from ember.runtime.torch_runner import TorchRunner

    if isinstance(text_encoder, TorchRunner):
        clip = text_encoder.module.text_encoder  # the CLIPTextModel inside ClipSkipTextEncoder
        dtype = next(clip.parameters()).dtype
        module = ExtendedTextEncoder(clip)
        return TorchRunner(TEXT_ENCODER_EXT, "", None, str(text_encoder.device), dtype, module=module)
    from ember.pipeline import base_models
    from ember.runtime import create_runner

    def load(source: str, revision: str | None, dtype: torch.dtype) -> ExtendedTextEncoder:
        return ExtendedTextEncoder(_load_text_encoder(source, revision, dtype, ref.variant).text_encoder)

    spec = dataclasses.replace(TEXT_ENCODER_EXT, load=load)
    artifacts = base_models.onnx_artifacts(settings, ref, (spec,))
    return create_runner(settings, artifacts, spec, refittable=True)  # LoRAs reach it (TextConditioner.refit)


class TextConditioner:
    """A base model's prompt encoding (`encode`, the three paths above). It is also the text encoder that
    LoRA fusing refits (`refit`), so that the extended encoder follows the plain one's weights."""

    def __init__(
        self,
        text_encoder: Runner,
        tokenizer: PreTrainedTokenizerBase,
        config_dir: Path,
        extended: Callable[[Runner], Runner],
    ):
        """`config_dir`: the text encoder's diffusers folder (config.json: vocab_size, hidden_size);
        `extended`: builds TEXT_ENCODER_EXT from the plain runner (extended_text_encoder), on first use."""
        config = json.loads((Path(config_dir) / "config.json").read_text(encoding="utf-8"))
        self.vocab_size = int(config["vocab_size"])
        self.width = int(config["hidden_size"])
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vocabularies = Vocabularies(tokenizer, self.width)
        self._make_extended = extended
        self._extended: Runner | None = None
        # Weights refit into the plain text encoder so far (LoRA fusing), by state-dict name: an extended
        # encoder with weights of its own (an ONNX export) gets them too, also when built later.
        self._refits: dict[str, torch.Tensor] = {}

    @property
    def extended(self) -> Runner:
        """Built on the first request that needs it."""
        if self._extended is None:
            extended = self._make_extended(self.text_encoder)
            if not self._shares_weights and self._refits:
                extended.refit(self._refits)
            self._extended = extended
        return self._extended

    @property
    def _shares_weights(self) -> bool:
        from ember.runtime.torch_runner import TorchRunner

        return isinstance(self.text_encoder, TorchRunner)  # extended_text_encoder wraps the same module

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Runner.refit for LoRA fusing (ember.pipeline.loras.LoraState): the plain text encoder, and the
        extended one where it does not share the plain one's weights."""
        self.text_encoder.refit(weights)
        if not self._shares_weights:
            self._refits.update(weights)
            if self._extended is not None:
                self._extended.refit(weights)

    def encode(
        self,
        prompts: list[str],
        clip_skip: int,
        prompt_weighting: bool = False,
        embeddings: Sequence[Embedding] = (),
    ) -> torch.Tensor:
        """(P, S, D) embeddings of `prompts` at `clip_skip`; ValueError names the field at fault."""
        if not prompt_weighting and not embeddings:  # 1. the common path
            hidden = self.text_encoder.run({"input_ids": tokenize(self.tokenizer, prompts)})["hidden_states"]
            return hidden[:, clip_skip]
        vocabulary = self.vocabularies.get(embeddings)
        if prompt_weighting:  # 3.
            weighted = weighted_embeddings(
                self.extended, vocabulary, prompts, clip_skip, self.vocab_size, self.width
            )
            check_length(weighted.shape[1])  # (P, 77 * windows, D): every runtime takes up to 8 windows
            return weighted
        ids = truncated_ids(vocabulary, prompts)  # 2.
        assert vocabulary.extra is not None  # there are embeddings
        feeds = {
            "input_ids": vocabulary.model_ids(ids, self.vocab_size),
            "attention_mask": torch.ones_like(ids),
            "extra_embeddings": vocabulary.extra,
        }
        return self.extended.run(feeds)["hidden_states"][:, clip_skip]


def truncated_ids(vocabulary: Vocabulary, prompts: list[str]) -> torch.Tensor:
    """(P, 77): multi-vector tokens expanded, then truncated and padded (with the tokenizer's own pad token)
    as diffusers' encode_prompt does after maybe_convert_prompt."""
    tokenizer = vocabulary.tokenizer
    length = tokenizer.model_max_length
    rows = []
    for text in prompts:
        ids = vocabulary.expand(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)[
            : length - 2
        ]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)


def by_sequence_length(slots: Sequence[GuidedSlot]) -> list[list[GuidedSlot]]:
    """Slots grouped by their embeddings' sequence length, in order: one UNet call takes one length, and
    padding a request's windows to another's would change its image (batch of N must equal N singles)."""
    groups: dict[int, list[GuidedSlot]] = {}
    for slot in slots:
        groups.setdefault(slot.embeddings.shape[1], []).append(slot)
    return list(groups.values())
