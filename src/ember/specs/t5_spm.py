"""A small T5 tokenizer built offline: a sentencepiece unigram model trained here, wrapped as T5Tokenizer.

The real PixArt-Σ tokenizer (google/t5-v1_1-xxl's 32,000-piece sentencepiece model plus 100 <extra_id_*>
tokens) is not available offline, and no installed wheel ships it. What tests need from it is its
behaviour, not its vocabulary: pieces with the T5 special ids (<pad>=0, </s>=1, <unk>=2, no <s>), `</s>`
appended, padding to a fixed length with an attention mask, truncation keeping `</s>`, the nmt_nfkc
normalizer and "▁" word boundaries. Training a unigram model with T5's options on English words gives all of
that. The training text is CLIP's BPE word list (shipped in open_clip_torch, see clip_bpe.py), so the
pieces are real English subwords; training is single-threaded and so gives the same model every time.
Real weights bring their own tokenizer (`tokenizer/` in the model repository).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from ember.specs.clip_bpe import NUM_MERGES, bpe_merges_path

SPM_VOCAB_SIZE = 1000  # real: 32,000
EXTRA_IDS = 100  # the <extra_id_*> sentinels T5 tokenizers carry; real T5 has 100 too
T5_MAX_LENGTH = 300  # PixArt-Σ's max_sequence_length


def _training_sentences(words_per_line: int = 12) -> list[str]:
    """English lines from CLIP's merge list: every merge that closes a word ("</w>") is a frequent word."""
    lines = gzip.decompress(bpe_merges_path().read_bytes()).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    words = ["".join(m.split()).removesuffix("</w>") for m in lines if m.endswith("</w>")]
    words = [w for w in words if w.isascii() and w.isprintable() and w.strip()]
    return [" ".join(words[i : i + words_per_line]) for i in range(0, len(words), words_per_line)]


def train_t5_spm() -> bytes:
    """The serialized sentencepiece model (unigram, T5's special ids and normalizer)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_sentences()),
        model_writer=model,
        model_type="unigram",
        vocab_size=SPM_VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # T5 has no <s>
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return model.getvalue()


def write_t5_tokenizer(directory: Path) -> Path:
    """Train the model and save a T5Tokenizer built from its pieces into `directory` (tokenizer.json,
    tokenizer_config.json; spiece.model beside them); `AutoTokenizer.from_pretrained(directory)` loads it.

    The vocabulary is passed as (piece, score) pairs read back through sentencepiece itself: transformers'
    own spiece.model converter needs a protobuf runtime at least as new as the one sentencepiece was
    generated with, which the pinned stack lacks. For the same reason the normalizer is NFKC rather than
    the model's precompiled nmt_nfkc charsmap; both agree on ASCII and ordinary Unicode text.
    """
    import sentencepiece as spm
    from tokenizers import normalizers
    from transformers import T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    model = train_t5_spm()
    (directory / "spiece.model").write_bytes(model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    # T5's layout: <pad>=0, </s>=1, <unk>=2, the pieces, then <extra_id_99> ... <extra_id_0>.
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=EXTRA_IDS, model_max_length=T5_MAX_LENGTH)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()
    tokenizer.save_pretrained(directory)
    return directory
