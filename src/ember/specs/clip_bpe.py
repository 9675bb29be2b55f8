"""CLIP's real byte-level BPE tokenizer files, built offline from the merges that `open_clip_torch` ships.

OpenAI's `bpe_simple_vocab_16e6.txt.gz` holds the 48,894 merges CLIP was trained with. The 49,408-token
vocabulary follows from them in a fixed order (256 byte symbols, the same with the `</w>` end-of-word suffix,
one token per merge, then the two special tokens), which is exactly the `vocab.json` of every SD1.5 repo on
the hub, so `CLIPTokenizer.from_pretrained(dir)` then tokenizes like the real one (ids, 77-token truncation).

The file is read from the installed wheel without importing `open_clip` (its import pulls torchvision).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# 49152 - 256 - 2 merges: the count CLIP used, so that the vocabulary ends at 49,408 tokens.
NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def bpe_merges_path() -> Path:
    """The merges file inside the installed `open_clip_torch` wheel."""
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "open_clip_torch is not installed: it ships CLIP's BPE merges "
            "(pip install --no-deps open_clip_torch, see pyproject.toml)"
        ) from exc
    for file in dist.files or ():
        if file.name == BPE_FILE:
            return Path(str(dist.locate_file(file)))
    raise RuntimeError(f"open_clip_torch {dist.version} has no {BPE_FILE}")


def write_clip_tokenizer(directory: Path, pad: str = EOS) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of CLIP ViT-L/14's tokenizer into `directory`.
    `pad`: the padding token; SDXL's tokenizer_2 pads with "!" (id 0) where CLIP pads with <|endoftext|>."""
    lines = gzip.decompress(bpe_merges_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(vocab_list) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built {len(vocab_list)} CLIP tokens, expected {CLIP_VOCAB_SIZE}")

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": pad,
        "unk_token": EOS,
        "do_lower_case": True,
        "add_prefix_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory
