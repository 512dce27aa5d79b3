"""Shared helpers for the data tests (no tests here): tiny corpora, tokenizers and an independent reader.

The reader below is written from the MMIDIDX byte layout alone (struct + plain Python), not from
megatron_ki.data.indexed, so that the round-trip tests check the format and not the code against itself.
"""

from __future__ import annotations

import json
import os
import random
import struct

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dog",
    "ran",
    "past",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "river",
    "mountain",
    "science",
    "history",
    "language",
    "model",
    "train",
    "data",
    "token",
    "piece",
    "word",
    "sentence",
    "paper",
    "knowledge",
    "teacher",
    "student",
    "large",
    "small",
]


def make_corpus(
    path: str, n_docs: int = 200, seed: int = 0, min_words: int = 3, max_words: int = 60
) -> list[str]:
    """Write ``n_docs`` JSON lines ``{"text": ...}`` of random words; return the texts."""
    rng = random.Random(seed)
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            words = [
                rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing", ""])
                for _ in range(rng.randint(min_words, max_words))
            ]
            text = " ".join(words)
            if rng.random() < 0.2:
                text += "\n" + " ".join(rng.choice(WORDS) for _ in range(5))
            texts.append(text)
            f.write(json.dumps({"text": text, "title": f"doc {len(texts)}"}) + "\n")
    return texts


def train_sp(directory: str, vocab_size: int = 300, model_type: str = "bpe") -> str:
    """A tiny sentencepiece model with <mask>, <pad>, <eod> trained on a generated corpus."""
    from megatron_ki.data.train_tokenizer import train_sentencepiece

    corpus = os.path.join(directory, "sp_corpus.jsonl")
    make_corpus(corpus, n_docs=400, seed=123)
    return train_sentencepiece(
        corpus,
        os.path.join(directory, f"sp_{model_type}"),
        vocab_size,
        model_type=model_type,
        special_tokens=["<mask>", "<pad>", "<eod>"],
        sample_size=0,
    )


def build_hf_tokenizer_dir(directory: str) -> str:
    """A local Hugging Face tokenizer directory (tokenizer.json) built with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(5)
    lines = [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(300)]
    tok.train_from_iterator(lines, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "mask_token": "<mask>",
            },
            f,
        )
    return directory


def write_gpt2_files(directory: str) -> tuple[str, str]:
    """A tiny GPT-2 style vocab.json/merges.txt (byte-level alphabet plus a few merges)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [
        ("t", "h"),
        ("th", "e"),
        ("\u0120", "the"),
        ("a", "t"),
        ("c", "at"),
        ("\u0120", "cat"),
        ("o", "n"),
    ]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(directory, exist_ok=True)
    vf, mf = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vf, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(mf, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vf, mf


DTYPE_FMT = {
    1: ("B", 1),
    2: ("b", 1),
    3: ("h", 2),
    4: ("i", 4),
    5: ("q", 8),
    6: ("d", 8),
    7: ("f", 4),
    8: ("H", 2),
}


def read_mmidx(prefix: str) -> dict:
    """Parse ``prefix.idx/.bin`` with struct only, from the documented byte layout."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00", raw[:9]
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1
    off = 34
    lengths = list(struct.unpack_from(f"<{n_seq}i", raw, off))
    off += 4 * n_seq
    pointers = list(struct.unpack_from(f"<{n_seq}q", raw, off))
    off += 8 * n_seq
    doc_idx = list(struct.unpack_from(f"<{n_doc}q", raw, off))
    off += 8 * n_doc
    assert off == len(raw), (off, len(raw))
    fmt, size = DTYPE_FMT[code]
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    seqs = [list(struct.unpack_from(f"<{n}{fmt}", data, p)) for n, p in zip(lengths, pointers)]
    return {
        "code": code,
        "itemsize": size,
        "lengths": lengths,
        "pointers": pointers,
        "doc_idx": doc_idx,
        "seqs": seqs,
        "bin_size": len(data),
    }


def make_indexed(
    prefix: str,
    n_docs: int,
    seed: int = 0,
    vocab: int = 500,
    min_len: int = 1,
    max_len: int = 40,
    low: int = 0,
) -> list[list[int]]:
    """Write an MMIDIDX dataset of random one-sequence documents (tokens in [low, vocab)); return them."""
    import numpy as np

    from megatron_ki.data.indexed import IndexedDatasetBuilder, optimal_dtype

    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, vocab, rng.integers(min_len, max_len + 1)).tolist() for _ in range(n_docs)]
    with IndexedDatasetBuilder(prefix, optimal_dtype(vocab)) as b:
        for d in docs:
            b.add_document(d)
    return docs
