"""Prompt conditioning of fal-ai/lora's SDXL bases: (embeddings, pooled text_embeds) for the prompt and, with
classifier-free guidance, the negative prompt, by the cheapest path that serves the request (as SD1.5's
ember.pipeline.text_conditioning):

1. plain: no embeddings, no prompt_weighting. Both plain clip-skip encoders, as diffusers'
   StableDiffusionXLPipeline.encode_prompt (ember.pipeline.sdxl.XLTextEncoders), left exactly as it was.
2. textual inversion (`embeddings`, SDXL files {"clip_l": (n, 768), "clip_g": (n, 1280)}): as diffusers'
   docs load them, clip_l's vectors into the first tokenizer + encoder and clip_g's into the second, each
   through its own tokenizer copy and extended encoder (ember.specs.lora_xl_text: the vectors ride along as
   `extra_embeddings`, nothing shared is mutated); multi-vector tokens expanded, then truncated to 77.
3. prompt_weighting (with or without embeddings): compel's SDXL API (compel 2.5.1 `CompelForSDXL`: one
   Compel per encoder, PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED, the second with requires_pooled) on the
   extended encoders. Prompts over 75 tokens become several 77-token windows; prompt and negative are padded
   with empty-prompt windows to the same length. The pooled embedding is compel's: the second encoder on the
   raw prompt text truncated to 77 tokens (compel applies no weights to it). compel 2.5.1's list form,
   Compel(tokenizer=[t1, t2], text_encoder=[e1, e2], requires_pooled=[False, True]), is deprecated there
   and cannot pad a prompt and a negative prompt of different lengths (its EmbeddingsProviderMulti has no
   empty_z), so it is not used.

Negative prompt and clip_skip, on every path as diffusers' SDXL encode_prompt treats them: fal's empty
negative prompt is diffusers' None, so on a model with force_zeros_for_empty_prompt (SDXL 1.0) the
unconditional branch is zeros (embeddings and pooled; for weighted prompts zeros of the padded prompt's
shape, as diffusers zeroes when given prompt_embeds and no negative); clip_skip applies to the prompt only
and the negative prompt is read at hidden_states[-2]. compel has no clip_skip: the weighted path reads the
layer diffusers' clip_skip reads (hidden_states[-(clip_skip + 2)], not normalized) wherever compel reads
hidden_states[-2], so clip_skip 0 is exactly compel, and a prompt without weighting syntax gives the same
conditioning with and without prompt_weighting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ember.pipeline.prompt_weighting import (
    CompelTextEncoder,
    _Expansions,
    check_length,
    check_windows,
)
from ember.pipeline.sdxl import XLPromptEmbeds, XLTextEncoders
from ember.pipeline.text_conditioning import TextConditioner, truncated_ids
from ember.pipeline.textual_inversion import Embedding, Vocabulary, check_families
from ember.runtime import Runner
from ember.settings import Settings
from ember.specs.base import NetworkSpec
from ember.specs.lora_xl_text import TEXT_ENCODER_2_XL_EXT, TEXT_ENCODER_XL_EXT

ENCODERS = ("text_encoder", "text_encoder_2")


class CompelXLTextEncoder(CompelTextEncoder):
    """What compel's EmbeddingsProvider calls in SDXL mode: text_encoder(input_ids (1, S), attention_mask
    (1, S) or None, output_hidden_states=..., return_dict=True) -> .hidden_states[-2] (1, S, D) and, from
    the second encoder, .text_embeds (1, P) for the pooled embedding; plus `.device`, `.dtype`.

    The returned hidden_states[-2] is the state the request's clip_skip picks from the extended encoder
    (hidden_states[-(clip_skip + 2)]; compel reads [-2], diffusers' clip_skip None)."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> SimpleNamespace:
        out = self.encode(input_ids, attention_mask)
        result = SimpleNamespace(hidden_states=(out["picked"], None), last_hidden_state=None)
        if "text_embeds" in out:  # compel's pooled embedding: no `pooler_output`, so it reads text_embeds
            result.text_embeds = out["text_embeds"]
        return result


def extended_xl_text_encoder(plain: Runner, spec: NetworkSpec, settings: Settings, ref: Any) -> Runner:
    """`spec` (TEXT_ENCODER_XL_EXT / TEXT_ENCODER_2_XL_EXT) for an SDXL base whose plain encoder is `plain`.

    torch: a wrapper over the plain runner's own CLIPTextModel(WithProjection), so LoRA refits reach both and
    no weight is held twice. onnxruntime: its own export, added to the base model's artifact directory
    (family lora/sdxl) on first use, refittable (TextConditioner.refit forwards LoRA weights to it)."""
    from ember.runtime.torch_runner import TorchRunner
    from ember.specs.lora_xl_text import ExtendedXLTextEncoder

    if isinstance(plain, TorchRunner):
        clip = plain.module.text_encoder  # the CLIPTextModel(WithProjection) inside the clip-skip wrapper
        dtype = next(clip.parameters()).dtype
        module = ExtendedXLTextEncoder(clip)
        return TorchRunner(spec, "", None, str(plain.device), dtype, module=module)
    from ember.pipeline import base_models
    from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner, provider_list

    runtime = base_models.lora_runtime(settings)
    if runtime != "onnxruntime":  # a request error (the caller answers ValueError as 422)
        raise ValueError(
            f"embeddings and prompt_weighting on SDXL base models run on torch or onnxruntime, not {runtime!r}"
        )
    bound = dataclasses.replace(spec, load=functools.partial(spec.load, variant=ref.variant))
    artifacts = base_models.onnx_artifacts(settings, ref, (bound,), family=base_models.LORA_XL_FAMILY)
    return OnnxRuntimeRunner(
        bound, artifacts.onnx_path(bound.name), providers=provider_list(settings), refittable=True
    )


class XLTextConditioner:
    """An SDXL base model's prompt conditioning (`encode`, the three paths above). `text` holds one
    TextConditioner per encoder (its tokenizer copies per embedding set, its extended encoder built on first
    use); they are also the text encoders LoRA fusing refits, so the extended ones follow the plain ones."""

    def __init__(
        self,
        encoders: Callable[[int], XLTextEncoders],
        runners: tuple[Runner, Runner],
        tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase],
        force_zeros: bool,
        settings: Settings,
        ref: Any,
    ):
        """`encoders(clip_skip)`: the plain path's encoders; `runners`: the plain text encoder runners;
        `ref`: the prepared base model (ref.source a diffusers directory: each encoder's config.json)."""
        root = Path(ref.source)
        self.encoders = encoders
        self.force_zeros = force_zeros
        self.text = tuple(
            TextConditioner(
                runner,
                tokenizer,
                root / folder,
                functools.partial(extended_xl_text_encoder, spec=spec, settings=settings, ref=ref),
            )
            for runner, tokenizer, folder, spec in zip(
                runners, tokenizers, ENCODERS, (TEXT_ENCODER_XL_EXT, TEXT_ENCODER_2_XL_EXT), strict=True
            )
        )

    def encode(
        self,
        prompt: str,
        negative_prompt: str,
        clip_skip: int,
        cfg: bool,
        prompt_weighting: bool = False,
        embeddings: Sequence[Embedding] = (),
    ) -> XLPromptEmbeds:
        """embeddings (R, S, D1 + D2) and pooled (R, P): R = 2 [negative; prompt] with `cfg`, else 1 [prompt].
        S is 77 except for long weighted prompts (77 * windows). ValueError names the field at fault."""
        if not prompt_weighting and not embeddings:  # 1. the common path
            positive = self.encoders(clip_skip).encode([prompt])
            if not cfg:
                return positive
            negative = self.encoders(0).encode_negative([negative_prompt or None], positive, self.force_zeros)
            return _stack(negative, positive)
        check_families(embeddings, xl_base=True)
        vocabularies = [
            t.vocabularies.get([e.for_encoder(k) for e in embeddings]) for k, t in enumerate(self.text)
        ]
        zeros = cfg and not negative_prompt and self.force_zeros  # diffusers: negative None -> zeros
        texts = [prompt] + ([negative_prompt] if cfg and not zeros else [])
        if prompt_weighting:  # 3.
            check_windows(vocabularies[0].tokenizer, texts)
            encoded = [self._weighted(vocabularies, text, skip) for text, skip in zip(texts, (clip_skip, 0))]
            length = max(e.embeddings.shape[1] for e, _ in encoded)
            check_length(length)  # torch and the ONNX export (dynamic text_sequence) take 77 * 1..8
            positive, *negative = [_pad(e, empty, length) for e, empty in encoded]
        else:  # 2.
            positive = self._with_embeddings(vocabularies, [prompt], clip_skip)
            negative = [self._with_embeddings(vocabularies, texts[1:], 0)] if len(texts) > 1 else []
        if not cfg:
            return positive
        if zeros:
            negative = [
                XLPromptEmbeds(torch.zeros_like(positive.embeddings), torch.zeros_like(positive.pooled))
            ]
        return _stack(negative[0], positive)

    def _with_embeddings(self, vocabularies: list[Vocabulary], texts: list[str], skip: int) -> XLPromptEmbeds:
        """2.: each encoder on its own tokenizer copy's ids (P, 77) with its embedding rows."""
        hidden, pooled = [], None
        for text, vocabulary in zip(self.text, vocabularies, strict=True):
            ids = truncated_ids(vocabulary, texts)
            assert vocabulary.extra is not None  # there are embeddings
            out = text.extended.run(
                {
                    "input_ids": vocabulary.model_ids(ids, text.vocab_size),
                    "attention_mask": torch.ones_like(ids),
                    "extra_embeddings": vocabulary.extra,
                }
            )
            hidden.append(out["hidden_states"][:, skip])  # (P, 77, D_k)
            pooled = out.get("text_embeds", pooled)  # the second encoder's (P, P2)
        assert pooled is not None
        return XLPromptEmbeds(torch.cat(hidden, dim=-1), pooled)

    def _weighted(
        self, vocabularies: list[Vocabulary], text: str, skip: int
    ) -> tuple[XLPromptEmbeds, torch.Tensor]:
        """3.: compel's SDXL conditioning of one prompt, (1, 77 * w, D1 + D2) and pooled (1, P), with the
        empty-prompt window (1, 77, D1 + D2) that pads it."""
        from compel import CompelForSDXL

        wrapped = [
            CompelXLTextEncoder(text.extended, vocabulary, skip, text.vocab_size, text.width)
            for text, vocabulary in zip(self.text, vocabularies, strict=True)
        ]
        pipe: Any = SimpleNamespace(
            tokenizer=vocabularies[0].tokenizer,
            text_encoder=wrapped[0],
            tokenizer_2=vocabularies[1].tokenizer,
            text_encoder_2=wrapped[1],
        )
        compel = CompelForSDXL(
            pipe, textual_inversion_manager=_Expansions(vocabularies[0]), device=str(wrapped[0].device)
        )
        # CompelForSDXL hands one manager to both encoders; each tokenizer copy expands its own ids.
        compel.compel_2.conditioning_provider.textual_inversion_manager = _Expansions(vocabularies[1])
        try:
            out = compel(text)
            empty = torch.cat(
                [c.conditioning_provider.empty_z for c in (compel.compel_1, compel.compel_2)], dim=-1
            )
        except Exception as exc:  # compel's parser and fragment matcher raise plain exceptions
            raise ValueError(f"prompt_weighting: cannot build the weighted prompt: {exc}") from exc
        return XLPromptEmbeds(out.embeds.float(), out.pooled_embeds.float()), empty.float()


def _pad(embeds: XLPromptEmbeds, empty: torch.Tensor, length: int) -> XLPromptEmbeds:
    """Padded with empty-prompt windows (1, 77, D) to `length` tokens, as compel pads prompt and negative."""
    windows = (length - embeds.embeddings.shape[1]) // empty.shape[1]
    padded = torch.cat([embeds.embeddings, *[empty.to(embeds.embeddings.device)] * windows], dim=1)
    return XLPromptEmbeds(padded, embeds.pooled)


def _stack(negative: XLPromptEmbeds, positive: XLPromptEmbeds) -> XLPromptEmbeds:
    """[negative; prompt] rows, the order guided_denoise takes."""
    return XLPromptEmbeds(
        torch.cat([negative.embeddings, positive.embeddings]), torch.cat([negative.pooled, positive.pooled])
    )
