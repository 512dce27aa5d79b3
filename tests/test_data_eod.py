"""The document separator: one rule (the eos, as Megatron-LM), --eod-token, the id recorded beside the data,
merges and blends refused when their separators differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ki.data import EodMismatchError, recorded_eod
from megatron_ki.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    merge_datasets,
    read_stats,
    stats_path,
    write_stats,
)
from megatron_ki.data.preprocess import main as preprocess_main
from megatron_ki.data.tokenizers import TokenizerError, build_tokenizer, resolve_eod_token
from tests.test_data_utils import make_corpus, read_mmidx, train_sp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eod")
    model = train_sp(str(d))
    corpus = d / "corpus.jsonl"
    texts = make_corpus(str(corpus), n_docs=40, seed=3)
    return {"dir": d, "model": model, "corpus": str(corpus), "texts": texts}


def _pp(assets, out: Path, *extra: str, corpus: str | None = None) -> int:
    argv = ["--input", corpus or assets["corpus"], "--output-prefix", str(out), "--log-interval", "0"]
    argv += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", assets["model"]]
    return preprocess_main([*argv, *extra])


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------------------------------ the rule
def test_default_separator_is_the_eos_megatron_appends(assets, tmp_path):
    import sentencepiece as spm

    eos = spm.SentencePieceProcessor(model_file=assets["model"]).eos_id()  # Megatron: sp.eos_id()
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    assert tok.eod == tok.eos == eos and tok.piece_to_id("<eod>") not in (None, eos)
    assert _pp(assets, tmp_path / "d", "--append-eod") == 0
    prefix = str(tmp_path / "d_text_document")
    seqs = read_mmidx(prefix)["seqs"]
    assert seqs == [[*tok.tokenize(t), eos] for t in assets["texts"]]
    assert read_stats(prefix)["eod_token_id"] == eos and recorded_eod([prefix]) == eos


def test_eod_token_piece_or_id_changes_only_document_ends(assets, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    eod_piece = tok.piece_to_id("<eod>")
    assert _pp(assets, tmp_path / "eos", "--append-eod") == 0
    assert _pp(assets, tmp_path / "piece", "--append-eod", "--eod-token", "<eod>") == 0
    assert _pp(assets, tmp_path / "id", "--append-eod", "--eod-token", str(eod_piece)) == 0
    for ext in (".bin", ".idx"):
        piece = (tmp_path / f"piece_text_document{ext}").read_bytes()
        assert piece == (tmp_path / f"id_text_document{ext}").read_bytes()
    eos_seqs = read_mmidx(str(tmp_path / "eos_text_document"))["seqs"]
    piece_seqs = read_mmidx(str(tmp_path / "piece_text_document"))["seqs"]
    assert [s[-1] for s in piece_seqs] == [eod_piece] * len(assets["texts"])
    assert [s[:-1] for s in piece_seqs] == [s[:-1] for s in eos_seqs]
    assert read_stats(str(tmp_path / "piece_text_document"))["eod_token_id"] == eod_piece
    assert build_tokenizer("SentencePieceTokenizer", assets["model"], eod_token="<eod>").eod == eod_piece


def test_without_append_eod_records_null(assets, tmp_path):
    assert _pp(assets, tmp_path / "n", "--partitions", "2") == 0
    record = read_stats(str(tmp_path / "n_text_document"))
    assert record["append_eod"] is False and "eod_token_id" in record and record["eod_token_id"] is None
    assert recorded_eod([str(tmp_path / "n_text_document")]) is None


def test_partitions_record_the_separator(assets, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    lines = Path(assets["corpus"]).read_text().splitlines(keepends=True)
    for k in range(2):
        (src / f"c{k}.jsonl").write_text("".join(lines[k::2]))
    corpus = str(src / "c*.jsonl")
    assert _pp(assets, tmp_path / "p", "--append-eod", "--partitions", "2", corpus=corpus) == 0
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    assert read_stats(str(tmp_path / "p_text_document"))["eod_token_id"] == tok.eos


# ------------------------------------------------------------------------------------------ refusals
def test_eod_token_without_append_eod_is_a_usage_error(assets, tmp_path, capsys):
    assert _pp(assets, tmp_path / "o" / "x", "--eod-token", "<eod>") == 2
    err = capsys.readouterr().err
    assert "--eod-token <eod>" in err and "--append-eod" in err
    assert _files(tmp_path / "o") == []


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "<nope>",
            "--eod-token '<nope>': no such piece in the vocabulary of SentencePieceTokenizer (300 tokens)",
        ),
        ("300", "--eod-token 300: id 300 is outside the vocabulary of SentencePieceTokenizer (300 tokens)"),
        ("-1", "--eod-token -1: id -1 is outside the vocabulary"),
    ],
)
def test_bad_eod_token(assets, tmp_path, capsys, spec, message):
    assert _pp(assets, tmp_path / "o" / "x", "--append-eod", "--eod-token", spec) == 1
    assert message in capsys.readouterr().err
    assert _files(tmp_path / "o") == []


def test_tokenizer_without_eos_needs_eod_token(assets, tmp_path, capsys):
    import sentencepiece as spm

    prefix = tmp_path / "noeos"
    spm.SentencePieceTrainer.train(
        input=str(assets["dir"] / "sp_corpus.jsonl"),
        model_prefix=str(prefix),
        vocab_size=120,
        eos_id=-1,
        user_defined_symbols=["<eod>"],
        minloglevel=2,
    )
    model = str(prefix) + ".model"
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert tok.eos is None and tok.eod is None
    args = {**assets, "model": model}
    assert _pp(args, tmp_path / "o" / "x", "--append-eod") == 1
    err = capsys.readouterr().err
    assert f"--append-eod: tokenizer SentencePieceTokenizer {model} has no eos token" in err
    assert "--eod-token" in err and _files(tmp_path / "o") == []
    assert _pp(args, tmp_path / "o" / "x", "--append-eod", "--eod-token", "<eod>") == 0
    assert {s[-1] for s in read_mmidx(str(tmp_path / "o" / "x_text_document"))["seqs"]} == {
        tok.piece_to_id("<eod>")
    }


def test_resolve_eod_token(assets):
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    assert resolve_eod_token(tok, "</s>") == tok.eos
    assert resolve_eod_token(tok, " 7 ") == 7
    with pytest.raises(TokenizerError, match=r"data\.eod_token '<EOD>': no such piece"):
        resolve_eod_token(tok, "<EOD>", option="data.eod_token")


# ---------------------------------------------------------------------------------- recorded and merged
def _dataset(prefix: Path, docs: list[list[int]], **stats) -> str:
    with IndexedDatasetBuilder(str(prefix), np.uint16) as b:
        for d in docs:
            b.add_document(d)
    if stats.pop("sidecar", True):
        write_stats(str(prefix), {**b.token_stats(), **stats})
    return str(prefix)


def test_recorded_eod_semantics(tmp_path):
    eos_a = _dataset(tmp_path / "a", [[7, 2]], eod_token_id=2)
    eos_b = _dataset(tmp_path / "b", [[8, 2]], eod_token_id=2)
    piece = _dataset(tmp_path / "p", [[9, 5]], eod_token_id=5)
    none = _dataset(tmp_path / "n", [[9]], eod_token_id=None)
    old = _dataset(tmp_path / "old", [[3, 5]])  # a sidecar written before the field existed
    bare = _dataset(tmp_path / "bare", [[3, 5]], sidecar=False)  # e.g. Megatron-LM's own tool
    assert recorded_eod([eos_a, eos_b]) == 2
    assert recorded_eod([old, eos_a, bare, eos_b]) == 2  # unknown ones never conflict
    assert recorded_eod([old, bare]) is None and recorded_eod([none, none]) is None
    with pytest.raises(EodMismatchError) as e:
        recorded_eod([eos_a, old, piece])
    assert str(e.value).startswith(f"{piece}: eod_token_id 5 ({piece}.stats.json) but {eos_a} records 2")
    with pytest.raises(EodMismatchError, match=rf"{none}: eod_token_id none \(no separator appended\)"):
        recorded_eod([eos_a, none])
    with open(eos_b + ".bin", "ab") as f:  # the .bin changed since: its sidecar says nothing any more
        f.write(np.uint16(5).tobytes())
    assert recorded_eod([piece, eos_b]) == 5


def _merge_tool(*argv: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "tools" / "merge_datasets.py")
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)


def test_merge_refuses_two_separators(assets, tmp_path):
    lines = Path(assets["corpus"]).read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:20]))
    (tmp_path / "b.jsonl").write_text("".join(lines[20:]))
    assert _pp(assets, tmp_path / "a", "--append-eod", corpus=str(tmp_path / "a.jsonl")) == 0
    assert (
        _pp(assets, tmp_path / "b", "--append-eod", "--eod-token", "<eod>", corpus=str(tmp_path / "b.jsonl"))
        == 0
    )
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    before = _files(tmp_path)
    r = _merge_tool("--input", a, b, "--output-prefix", str(tmp_path / "out" / "ab"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{b}: eod_token_id 5 ({stats_path(b)}) but {a} records 2 ({stats_path(a)})" in r.stderr
    assert _files(tmp_path) == before
    with pytest.raises(EodMismatchError):
        merge_datasets([a, b], str(tmp_path / "lib"))
    assert _files(tmp_path) == before


def test_merge_records_the_separator_all_inputs_share(tmp_path):
    a = _dataset(tmp_path / "a", [[7, 2]], eod_token_id=2)
    b = _dataset(tmp_path / "b", [[8, 9, 2]], eod_token_id=2)
    bare = _dataset(tmp_path / "bare", [[3, 2]], sidecar=False)
    r = _merge_tool("--input", a, b, "--output-prefix", str(tmp_path / "ab"))
    assert r.returncode == 0, r.stderr
    assert read_stats(str(tmp_path / "ab"))["eod_token_id"] == 2
    assert IndexedDataset(str(tmp_path / "ab")).num_documents == 2
    r = _merge_tool("--input", a, bare, "--output-prefix", str(tmp_path / "abare"))
    assert r.returncode == 0, r.stderr
    record = read_stats(str(tmp_path / "abare"))
    assert record is not None and "eod_token_id" not in record  # one input's separator is unknown
    assert recorded_eod([str(tmp_path / "abare"), a]) == 2


# ---------------------------------------------------------------------------------------- tokenizers
def test_bert_style_vocabulary_without_eos_uses_sep(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        ["the cat sat on the mat"] * 5, trainers.WordPieceTrainer(vocab_size=80, special_tokens=specials)
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {f"{k.strip('[]').lower()}_token": k for k in specials}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config})
    )
    ours = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert ours.eos is None and ours.sep == tok.token_to_id("[SEP]") and ours.eod == ours.sep
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    argv = ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"), "--append-eod"]
    assert (
        preprocess_main(
            [*argv, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)]
        )
        == 0
    )
    assert read_mmidx(str(tmp_path / "o_text_document"))["seqs"] == [[*ours.tokenize("the cat"), ours.sep]]


def test_hf_tokenizer_without_eos_or_sep_needs_eod_token(tmp_path, capsys):
    from tests.test_data_utils import build_family_tokenizer_dir

    d = tmp_path / "tok"
    build_family_tokenizer_dir(str(d), "qwen2.5")
    (d / "tokenizer_config.json").unlink()  # a bare tokenizer.json names no eos
    ours = build_tokenizer("HuggingFaceTokenizer", str(d))
    assert ours.eos is None and ours.eod is None
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    argv = [
        "--input",
        str(tmp_path / "c.jsonl"),
        "--output-prefix",
        str(tmp_path / "o" / "x"),
        "--append-eod",
    ]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(d)]
    assert preprocess_main(argv) == 1
    assert f"tokenizer HuggingFaceTokenizer {d} has no eos token" in capsys.readouterr().err
    assert preprocess_main([*argv, "--eod-token", "<|endoftext|>"]) == 0
    assert read_mmidx(str(tmp_path / "o" / "x_text_document"))["seqs"][0][-1] == ours.piece_to_id(
        "<|endoftext|>"
    )


def test_help_states_the_rule():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for needle in (
        "--eod-token PIECE_OR_ID",
        "sp.eos_id()",
        "eos_token_id",
        "<|endoftext|>",
        "<EOD>",
        "eod_token_id",
    ):
        assert needle in text, needle
