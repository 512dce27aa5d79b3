"""Llama 3 / Qwen2.5 / Qwen3 / Mistral-shaped tokenizer.json directories in tools/preprocess_data.py: the ids are
transformers' own (no special tokens added), each document ends with the family's eos, the vocabulary size
(1,003 for the Llama 3 ones) is recorded as it is."""

from __future__ import annotations

import json

import pytest

from megatron_ki.data.indexed import read_stats
from megatron_ki.data.preprocess import main as preprocess_main
from megatron_ki.data.tokenizers import build_tokenizer
from tests.test_data_utils import FAMILY_TEXTS, HF_FAMILIES, WORDS, build_family_tokenizer_dir, read_mmidx

FAMILY_EOS = {
    "llama3": "<|end_of_text|>",
    "llama3-instruct": "<|eot_id|>",
    "qwen2.5": "<|endoftext|>",
    "qwen3": "<|im_end|>",
    "mistral": "</s>",
}
"""The eos each family's tokenizer_config.json names: what Megatron-LM appends, so what we must append."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_families")
    texts = [
        *FAMILY_TEXTS,
        "special strings in text: <|endoftext|> <|im_end|> <|eot_id|> </s> <s>",
        "  leading spaces and a trailing one ",
        *(" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i)) for i in range(20)),
    ]
    path = d / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return {"dir": d, "path": str(path), "texts": texts}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tokenizers")
    return {f: build_family_tokenizer_dir(str(root / f), f) for f in HF_FAMILIES}


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_family_ids_and_separator(corpus, family_dirs, tmp_path, family):
    from transformers import AutoTokenizer

    path = family_dirs[family]
    auto = AutoTokenizer.from_pretrained(path, local_files_only=True)
    eos = auto.convert_tokens_to_ids(FAMILY_EOS[family])
    assert auto.eos_token_id == eos  # the fixture is shaped like the family
    out = str(tmp_path / "x")
    workers = "2" if family == "llama3" else "1"
    argv = ["--input", corpus["path"], "--output-prefix", out, "--append-eod", "--workers", workers]
    assert (
        preprocess_main([*argv, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", path]) == 0
    )
    data = read_mmidx(out + "_text_document")
    expected = [[*auto.encode(t, add_special_tokens=False), eos] for t in corpus["texts"]]
    assert data["seqs"] == expected
    assert data["doc_idx"] == list(range(len(expected) + 1)) and data["code"] == 8  # uint16
    stats = read_stats(out + "_text_document")
    assert stats["vocab_size"] == len(auto) and stats["eod_token_id"] == eos
    assert stats["max_token_id"] == max(max(s) for s in expected)
    if family.startswith("llama3"):
        assert len(auto) == 1003


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_family_ids_are_picked_like_megatron(family_dirs, family):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(family_dirs[family], local_files_only=True)
    tok = build_tokenizer("HuggingFaceTokenizer", family_dirs[family])
    vocab = auto.get_vocab()
    assert tok.vocab_size == len(auto) and tok.eos == tok.eod == vocab[FAMILY_EOS[family]]
    assert tok.bos == auto.bos_token_id and tok.pad == auto.pad_token_id
    for piece in ("<|endoftext|>", FAMILY_EOS[family], auto.bos_token):
        if piece in vocab:
            assert vocab[piece] in tok.special_ids  # never masked, whichever is the separator
    text = FAMILY_TEXTS[2]
    assert tok.tokenize(text) == auto.encode(text, add_special_tokens=False)
    assert tok.detokenize(tok.tokenize(text)) == text


def test_qwen3_eod_is_im_end_not_endoftext(family_dirs, corpus, tmp_path):
    """Qwen3's tokenizer has <|endoftext|> but names <|im_end|> as eos: Megatron appends the eos, so do we;
    --eod-token '<|endoftext|>' still gives the other one."""
    tok = build_tokenizer("HuggingFaceTokenizer", family_dirs["qwen3"])
    endoftext = tok.piece_to_id("<|endoftext|>")
    assert endoftext is not None and tok.eod == tok.piece_to_id("<|im_end|>") != endoftext
    out = str(tmp_path / "q")
    argv = ["--input", corpus["path"], "--output-prefix", out, "--append-eod", "--eod-token", "<|endoftext|>"]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", family_dirs["qwen3"]]
    assert preprocess_main(argv) == 0
    assert {s[-1] for s in read_mmidx(out + "_text_document")["seqs"]} == {endoftext}
    assert read_stats(out + "_text_document")["eod_token_id"] == endoftext
