"""CLIP's real BPE, built offline from the merges open_clip_torch ships, tokenizes like the hub tokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer, CLIPTokenizer

from ember.pipeline.encode import tokenize
from ember.specs.clip_bpe import write_clip_tokenizer


def test_known_clip_ids(tmp_path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    assert len(tokenizer) == 49408
    # openai/clip-vit-large-patch14 ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # lower-casing, punctuation and the </w> word ends: hello , world !
    assert tokenizer("Hello, World!").input_ids == [49406, 3306, 267, 1002, 256, 49407]


def test_pipeline_tokenizer_pads_and_truncates_to_77(lcm_artifacts) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lcm_artifacts.tokenizer_dir)
    ids = tokenize(tokenizer, ["a cat", "word " * 200])  # (2, 77)
    assert ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (ids[0, 4:] == 49407).all()
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncated, still closed by <|endoftext|>
