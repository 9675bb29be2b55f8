"""fal-ai/lora's `prompt_weighting`: compel's syntax and long prompts, run on our text-encoder runner.

compel (https://github.com/damian0815/compel, pinned in pyproject.toml) parses the syntax ((word)1.2,
word+, word-, .and(), .blend()) and builds the conditioning: a weighted token's embedding is pushed away
from the empty prompt's by its weight; a down-weighted fragment is lerped towards the same prompt with that
fragment's keys masked out (attention_mask); with truncate_long_prompts=False a prompt over 75 tokens becomes
several 77-token windows, each with its own <|startoftext|> / <|endoftext|>, concatenated along the sequence,
and the shorter of prompt and negative prompt is padded with empty-prompt windows to the other's length.

compel calls its text encoder as a transformers CLIPTextModel; CompelTextEncoder is that call on the
extended text encoder runner (ember.specs.lora_text), so it works on every runtime and carries the
request's textual-inversion rows and clip_skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from compel import Compel
from compel.embeddings_provider import BaseTextualInversionManager
from transformers import PreTrainedTokenizerBase

from ember.pipeline.textual_inversion import Vocabulary
from ember.runtime import Runner
from ember.specs.lora_text import EXTRA_TOKENS

# Windows of 75 tokens one weighted prompt may span: each adds 77 keys to every cross-attention of every
# UNet call, so an unbounded prompt would be a way to make one request arbitrarily slow.
MAX_WINDOWS = 8


class CompelTextEncoder:
    """What compel's EmbeddingsProvider calls: text_encoder(input_ids (1, 77), attention_mask (1, 77) or None,
    output_hidden_states=..., return_dict=True).last_hidden_state -> (1, 77, D), and `.device`, `.dtype`.

    The state returned is the one the request's clip_skip picks (the runner returns all three, each through
    the final layer norm), so compel runs in its LAST_HIDDEN_STATES_NORMALIZED mode for any clip_skip; for
    clip_skip 1 that equals compel's own PENULTIMATE_HIDDEN_STATES_NORMALIZED."""

    dtype = torch.float32

    def __init__(self, runner: Runner, vocabulary: Vocabulary, clip_skip: int, vocab_size: int, width: int):
        self.runner = runner
        self.device = runner.device
        self.vocabulary = vocabulary
        self.clip_skip = clip_skip
        self.vocab_size = vocab_size
        # (E, D): the request's textual-inversion rows, or zeros no id points at.
        self.extra = vocabulary.extra if vocabulary.extra is not None else torch.zeros(EXTRA_TOKENS, width)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> SimpleNamespace:
        out = self.encode(input_ids, attention_mask)
        return SimpleNamespace(last_hidden_state=out["picked"], hidden_states=None)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The runner's outputs for compel's ids (textual-inversion ids mapped to the extra rows), plus
        "picked": the hidden state (B, S, D) the request's clip_skip selects."""
        ids = self.vocabulary.model_ids(input_ids.long().cpu(), self.vocab_size)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long().cpu()
        out = dict(
            self.runner.run({"input_ids": ids, "attention_mask": mask, "extra_embeddings": self.extra})
        )
        out["picked"] = out["hidden_states"][:, self.clip_skip]
        return out


class _Expansions(BaseTextualInversionManager):
    """Multi-vector textual-inversion tokens expanded by id (compel's DiffusersTextualInversionManager does
    the same through the pipeline's maybe_convert_prompt)."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        return self.vocabulary.expand(token_ids)


def check_windows(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> None:
    """ValueError unless each prompt fits in MAX_WINDOWS windows of 75 tokens."""
    window = tokenizer.model_max_length - 2
    for text in prompts:
        count = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if count > window * MAX_WINDOWS:
            raise ValueError(
                f"prompt_weighting: a prompt of {count} tokens; at most {window * MAX_WINDOWS} "
                f"({MAX_WINDOWS} windows of {window}) are served"
            )


def check_length(length: int) -> None:
    """ValueError for weighted conditioning of more than MAX_WINDOWS 77-token windows (`length` tokens), which
    check_windows lets through when multi-vector embeddings expand a prompt after it counted the tokens.
    Every runtime takes up to MAX_WINDOWS: torch any length, the ONNX exports' dynamic text_sequence axis
    (ember.specs.lora.UNET, ember.specs.lora_xl.UNET) any multiple of 77."""
    if length > 77 * MAX_WINDOWS:
        raise ValueError(
            f"prompt_weighting: a prompt of {length // 77} windows of 75 tokens once its embeddings are "
            f"expanded; at most {MAX_WINDOWS} are served: shorten the prompt"
        )


def weighted_embeddings(
    runner: Runner,
    vocabulary: Vocabulary,
    prompts: Sequence[str],
    clip_skip: int,
    vocab_size: int,
    width: int,
) -> torch.Tensor:
    """(P, 77 * w, D): compel's conditioning for each prompt, all padded to the same w windows."""
    check_windows(vocabulary.tokenizer, prompts)
    compel: Any = Compel(
        tokenizer=vocabulary.tokenizer,
        text_encoder=CompelTextEncoder(runner, vocabulary, clip_skip, vocab_size, width),
        textual_inversion_manager=_Expansions(vocabulary),
        truncate_long_prompts=False,
        device=str(runner.device),
    )
    try:
        return compel(list(prompts)).float()
    except Exception as exc:  # compel's parser and fragment matcher raise plain exceptions
        raise ValueError(f"prompt_weighting: cannot build the weighted prompt: {exc}") from exc
