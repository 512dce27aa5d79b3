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


FAMILY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge inheritance reuses what a teacher model already knows.",
    "naïve café — déjà vu ✓ 東京 2024! Ünïcödé and emoji 🙂",
    "Tabs\tand  double  spaces, then a newline\nand more text.",
]
"""Texts for the family tokenizers: ASCII, accents, CJK, emoji, whitespace runs."""

# name: (tokenizer_class, specials added in this order, tokenizer_config entries, total size or None)
HF_FAMILIES: dict[str, tuple[str, list[str], dict, int | None]] = {
    "llama3": (
        "PreTrainedTokenizerFast",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        1003,  # filled with <|reserved_special_token_N|> as Llama 3 does: a size that divides by nothing useful
    ),
    "llama3-instruct": (
        "PreTrainedTokenizerFast",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        1003,
    ),
    "qwen2.5": (
        "Qwen2Tokenizer",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        None,
    ),
    "qwen3": (
        "Qwen2Tokenizer",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        None,
    ),
    "mistral": (
        "LlamaTokenizer",
        [],  # <unk>, <s>, </s> are the first three pieces, as in Mistral's tokenizer.json
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        None,
    ),
}
"""Tokenizers shaped like Llama 3 (base and instruct), Qwen2.5, Qwen3 (eos <|im_end|>) and Mistral."""


def build_family_tokenizer_dir(directory: str, family: str) -> str:
    """A small ``tokenizer.json`` + ``tokenizer_config.json`` of ``family`` (HF_FAMILIES), built offline.

    Byte-level BPE with the family's added special tokens (Llama 3, Qwen), or a Metaspace BPE with byte
    fallback and ``<unk>/<s>/</s>`` (Mistral), trained on a few sentences; eos as the real family names it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer_class, specials, config, total = HF_FAMILIES[family]
    rng = random.Random(9)
    lines = [*FAMILY_TEXTS, *(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200))]
    if family == "mistral":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if total is not None:
        reserved = [f"<|reserved_special_token_{i}|>" for i in range(total - tok.get_vocab_size())]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    bos = config.get("bos_token")
    if bos is not None:  # Llama and Mistral prepend bos when special tokens are added (not by preprocessing)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": tokenizer_class, **config}, f)
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
