"""Textual-inversion files of fal-ai/lora's `embeddings`: which tensor holds the vectors, and which prompt
token stands for which vector.

Pure Python over a safetensors header's names, dtypes and shapes, so the gateway refuses a bad file with a
422 at `embeddings[i]` before anything is queued, and the model (ember.pipeline.textual_inversion) applies
the very same rules to the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.endpoints.common import InputError, check_url

if TYPE_CHECKING:
    from ember.endpoints.base import MediaLoader
    from ember.endpoints.lora.schema import LoraInput

# One file's vectors: a multi-vector embedding longer than a prompt window (75 tokens) could never be used.
MAX_VECTORS = 75
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class EmbeddingLayout:
    key: str  # the tensor holding the vectors (SDXL: "clip_l", for the first text encoder)
    vectors: int  # n: rows of that tensor
    width: int  # D: the text encoder's hidden size the embedding was trained for
    key_2: str | None = None  # SDXL: "clip_g", (n, D2) for the second text encoder; None: one encoder
    width_2: int = 0

    @property
    def is_sdxl(self) -> bool:
        return self.key_2 is not None


def embedding_layout(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> EmbeddingLayout:
    """The layout of an embedding file from {tensor name: (safetensors dtype, shape)}; ValueError says why
    a file is not one. Formats, as diffusers' load_textual_inversion reads them:
    - kohya / A1111 safetensors: {"emb_params": (n, D)};
    - A1111 .pt layout flattened into safetensors: {"string_to_param.*": (n, D)};
    - diffusers: one tensor {"<token>": (D,) or (n, D)};
    - SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}, one row set per text encoder (diffusers' docs load
      each with load_textual_inversion into its own encoder and tokenizer)."""
    names = set(tensors)
    if names & set(SDXL_KEYS):
        return _sdxl_layout(tensors)
    if "emb_params" in names:
        key = "emb_params"
    elif "string_to_param.*" in names:
        key = "string_to_param.*"
    elif len(names) == 1:
        (key,) = names
    else:
        found = ", ".join(sorted(names)[:5]) or "no tensors"
        raise ValueError(
            "not a textual-inversion embedding: expected one tensor (diffusers: {token: vectors}), "
            f"'emb_params' (kohya / A1111) or 'string_to_param.*', found {found}"
        )
    vectors, width = _vectors(key, *tensors[key])
    return EmbeddingLayout(key, vectors, width)


def _sdxl_layout(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> EmbeddingLayout:
    if set(tensors) != set(SDXL_KEYS):
        raise ValueError(
            "an SDXL embedding holds exactly two tensors, 'clip_l' (vectors, 768) and 'clip_g' "
            f"(vectors, 1280); found {', '.join(sorted(tensors)[:5])}"
        )
    (vectors, width), (vectors_2, width_2) = (_vectors(key, *tensors[key]) for key in SDXL_KEYS)
    if vectors != vectors_2:
        raise ValueError(
            f"this SDXL embedding holds {vectors} 'clip_l' vector(s) but {vectors_2} 'clip_g' vector(s); "
            "each token needs one of each"
        )
    return EmbeddingLayout(SDXL_KEYS[0], vectors, width, SDXL_KEYS[1], width_2)


def _vectors(key: str, dtype: str, shape: Sequence[int]) -> tuple[int, int]:
    """(n, D) of one embedding tensor; ValueError unless it holds 1 to MAX_VECTORS float vectors."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"embedding tensor {key!r} holds {dtype}, not floating-point vectors")
    if len(shape) == 1:
        vectors, width = 1, shape[0]
    elif len(shape) == 2:
        vectors, width = shape
    else:
        raise ValueError(f"embedding tensor {key!r} has shape {list(shape)}; expected (D,) or (vectors, D)")
    if not 1 <= vectors <= MAX_VECTORS or width < 1:
        raise ValueError(
            f"embedding tensor {key!r} holds {vectors} vector(s) of width {width}; expected 1 to {MAX_VECTORS}"
        )
    return int(vectors), int(width)


def family_mismatch(layout: EmbeddingLayout, xl_base: bool) -> str | None:
    """Why an embedding cannot go on this base model (SD1.5 files on SDXL and back), or None."""
    if layout.is_sdxl and not xl_base:
        return (
            "an SDXL embedding (clip_l/clip_g vectors for two text encoders) on an SD1.5 base model; "
            "use an SD1.5 embedding (one tensor), or an SDXL base model"
        )
    if xl_base and not layout.is_sdxl:
        return (
            f"an SD1.5 embedding (one tensor of width {layout.width}) on an SDXL base model, "
            "which takes SDXL embeddings: {'clip_l': (vectors, 768), 'clip_g': (vectors, 1280)}"
        )
    return None


def local_base_is_sdxl(model_name: str) -> bool | None:
    """For a local diffusers directory (already checked against the model root): whether it is SDXL (its
    model_index.json names a second text encoder); None when the gateway cannot tell (HF ids, single
    files: the Triton side checks those)."""
    import json
    from pathlib import Path

    if model_name.startswith(("http://", "https://", "data:")) or not model_name.startswith(("/", "~", ".")):
        return None
    try:
        index = Path(model_name).expanduser().resolve() / "model_index.json"
        return "text_encoder_2" in json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_tokens(tokens: Sequence[str]) -> None:
    """ValueError unless `tokens` are usable prompt tokens: at least one, none empty, no whitespace."""
    if not tokens:
        raise ValueError("at least one token is needed to use the embedding in a prompt")
    for token in tokens:
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError(f"token {token!r} must be one word (no spaces), e.g. '<s0>'")
    if len(set(tokens)) < len(tokens):
        raise ValueError(f"tokens {list(tokens)} hold duplicates")


def token_vectors(tokens: Sequence[str], vectors: int) -> list[tuple[str, list[int]]]:
    """Which prompt token stands for which rows of the file, as diffusers' load_textual_inversion maps them:
    - as many tokens as vectors (more than one): token i -> vector i (diffusers given the (n, D) tensor and
      a token list; the pivotal-tuning convention that fal's default tokens ["<s0>", "<s1>"] name);
    - otherwise tokens[0] -> all n vectors in order, and any further token is unused (diffusers given the
      file: a multi-vector embedding, whose token expands to n tokens in the prompt)."""
    if len(tokens) == vectors > 1:
        return [(token, [i]) for i, token in enumerate(tokens)]
    return [(tokens[0], list(range(vectors)))]


# The gateway side: checks, fetches and OPTIONS entries of the request's `embeddings`.


def check_embeddings(inp: LoraInput) -> None:
    """422 at embeddings[i] for a path that is not a URL / data URI, or unusable tokens."""
    seen: dict[str, int] = {}
    for i, embedding in enumerate(inp.embeddings):
        loc = ("body", "embeddings", i, "path")
        if not embedding.path.startswith(("http://", "https://", "data:")):
            raise InputError(
                loc,
                "embedding weights must be an http(s) URL or a data: URI of a .safetensors file "
                "(Hugging Face ids and server paths are not supported)",
                "url_not_allowed",
            )
        check_url(embedding.path, loc)
        try:
            check_tokens(embedding.tokens)
        except ValueError as exc:
            raise InputError(("body", "embeddings", i, "tokens"), str(exc)) from None
        for token in embedding.tokens:
            if token in seen:
                raise InputError(
                    ("body", "embeddings", i, "tokens"),
                    f"token {token!r} is already used by embeddings[{seen[token]}]",
                )
            seen[token] = i


async def load_embeddings(inp: LoraInput, media: MediaLoader) -> list[bytes]:
    """Each embedding file, fetched and checked as safetensors, then as an embedding for the base model's
    family where the gateway knows it (a local directory): 422 at its path."""
    files = []
    xl_base = local_base_is_sdxl(inp.model_name) if inp.embeddings else None
    for i, embedding in enumerate(inp.embeddings):
        loc = ("body", "embeddings", i, "path")
        weights = await media.weights(embedding.path, loc)
        try:
            layout = embedding_layout({name: (t.dtype, t.shape) for name, t in weights.tensors.items()})
        except ValueError as exc:
            raise InputError(loc, str(exc), "invalid_embedding") from None
        mismatch = family_mismatch(layout, xl_base) if xl_base is not None else None
        if mismatch:
            raise InputError(loc, mismatch, "invalid_embedding")
        files.append(weights.data)
    return files


def embedding_options(inp: LoraInput, first_file: int) -> list[dict[str, object]]:
    """OPTIONS "embeddings": each entry's file index in LORA_FILES (from `first_file` on) and tokens."""
    return [{"file": first_file + i, "tokens": list(e.tokens)} for i, e in enumerate(inp.embeddings)]
