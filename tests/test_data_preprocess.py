"""tools/preprocess_data.py, train_tokenizer.py, merge_datasets.py, build_demo_corpus.py end to end."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ki.data.indexed import IndexedDataset
from megatron_ki.data.preprocess import main as preprocess_main
from megatron_ki.data.tokenizers import build_tokenizer
from tests.test_data_utils import build_hf_tokenizer_dir, make_corpus, read_mmidx, train_sp, write_gpt2_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    model = train_sp(str(d))
    corpus = str(d / "corpus.jsonl")
    texts = make_corpus(corpus, n_docs=120, seed=7)
    return {"dir": d, "model": model, "corpus": corpus, "texts": texts}


def _sp_args(assets, out: str, *extra: str) -> list[str]:
    return [
        "--input",
        assets["corpus"],
        "--output-prefix",
        out,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        assets["model"],
        "--log-interval",
        "50",
        *extra,
    ]


def _outputs(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".idx")) or ".tmp" in f)


def test_train_tokenizer_special_tokens(assets):
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    assert tok.vocab_size == 300
    assert (tok.mask, tok.pad, tok.eod) == (3, 4, 5)  # user symbols follow <unk>, <s>, </s>
    assert tok.cls == tok.bos == 1 and tok.sep == tok.eos == 2
    text = "the cat <mask> sat"
    assert tok.mask in tok.tokenize(text)  # never split
    assert tok.detokenize(tok.tokenize("the quick fox")) == "the quick fox"


def test_train_tokenizer_cli_unigram_from_txt(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(make_corpus(str(tmp_path / "c.jsonl"), n_docs=300, seed=3)))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools/train_tokenizer.py"),
            "--input",
            str(txt),
            "--model-prefix",
            str(tmp_path / "u"),
            "--vocab-size",
            "120",
            "--model-type",
            "unigram",
            "--sample-size",
            "200",
            "--num-threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "120 pieces" in r.stdout and "<mask>=3" in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools/train_tokenizer.py"),
            "--input",
            str(txt),
            "--model-prefix",
            str(tmp_path / "v"),
            "--vocab-size",
            "40",
            "--sample-size",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "--sample-size 50" in r.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_sentencepiece(assets, tmp_path, workers, capsys):
    out = str(tmp_path / "sp")
    assert (
        preprocess_main(
            _sp_args(assets, out, "--append-eod", "--workers", str(workers), "--chunk-lines", "17")
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "documents: 120" in captured.out and "bad lines: 0" in captured.out
    assert "docs/s" in captured.err and "tokens/s" in captured.err and "MB/s" in captured.err
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    ref = read_mmidx(out + "_text_document")
    assert ref["code"] == 8  # uint16 for a 300-piece vocabulary
    expected = [[*tok.tokenize(t), tok.eod] for t in assets["texts"]]
    assert ref["seqs"] == expected
    assert ref["doc_idx"] == list(range(121))
    ds = IndexedDataset(out + "_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_workers_and_partitions_give_identical_files(assets, tmp_path):
    part_dir = tmp_path / "in"
    part_dir.mkdir()
    lines = Path(assets["corpus"]).read_text().splitlines(keepends=True)
    for k in range(3):
        opener = gzip.open if k == 1 else open
        with opener(part_dir / f"c{k}.jsonl{'.gz' if k == 1 else ''}", "wt") as f:
            f.writelines(lines[k * 40 : (k + 1) * 40])
    base = [
        "--input",
        str(part_dir / "c*.jsonl*"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        assets["model"],
        "--append-eod",
    ]
    assert preprocess_main([*base, "--output-prefix", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert preprocess_main([*base, "--output-prefix", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert preprocess_main([*base, "--output-prefix", str(tmp_path / "three"), "--partitions", "3"]) == 0
    ref = read_mmidx(str(tmp_path / "one_text_document"))
    assert len(ref["seqs"]) == 120
    assert (tmp_path / "one_text_document.bin").read_bytes() == (
        tmp_path / "two_text_document.bin"
    ).read_bytes()
    assert (tmp_path / "one_text_document.idx").read_bytes() == (
        tmp_path / "two_text_document.idx"
    ).read_bytes()
    three = read_mmidx(str(tmp_path / "three_text_document"))
    # partitions are file groups (c0 + ... round robin), merged in partition order: same documents
    assert sorted(map(tuple, three["seqs"])) == sorted(map(tuple, ref["seqs"]))
    assert three["doc_idx"] == list(range(121))
    assert not [f for f in os.listdir(tmp_path) if "part" in f or ".tmp" in f]


def test_multiple_keys_and_empty_documents(assets, tmp_path, capsys):
    src = tmp_path / "k.jsonl"
    rows = [
        {"text": "the cat", "title": "river"},
        {"text": "", "title": "dog"},
        {"text": "fox", "title": "  "},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "k")
    argv = [
        "--input",
        str(src),
        "--output-prefix",
        out,
        "--json-keys",
        "text",
        "title",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        assets["model"],
    ]
    assert preprocess_main(argv) == 0
    assert "skipped empty documents: 2" in capsys.readouterr().out
    tok = build_tokenizer("SentencePieceTokenizer", assets["model"])
    assert read_mmidx(out + "_text_document")["seqs"] == [tok.tokenize("the cat"), tok.tokenize("fox")]
    assert read_mmidx(out + "_title_document")["seqs"] == [tok.tokenize("river"), tok.tokenize("dog")]


def test_huggingface_tokenizer_directory(assets, tmp_path):
    hf_dir = build_hf_tokenizer_dir(str(tmp_path / "hf"))
    out = str(tmp_path / "hf_out")
    argv = [
        "--input",
        assets["corpus"],
        "--output-prefix",
        out,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        hf_dir,
        "--append-eod",
        "--workers",
        "2",
    ]
    assert preprocess_main(argv) == 0
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    assert tok.eod == tok.eos == 2 and tok.pad == 3 and tok.mask == 4
    ds = IndexedDataset(out + "_text_document")
    assert ds.num_documents == 120
    for i, text in enumerate(assets["texts"]):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids[:-1]) == text  # byte-level BPE is lossless


def test_gpt2_bpe_vocab_and_merges(tmp_path):
    vf, mf = write_gpt2_files(str(tmp_path / "gpt2"))
    src = tmp_path / "g.jsonl"
    src.write_text(
        json.dumps({"text": "the cat on the mat"}) + "\n" + json.dumps({"text": "théâtre ✓"}) + "\n"
    )
    out = str(tmp_path / "g")
    argv = [
        "--input",
        str(src),
        "--output-prefix",
        out,
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        vf,
        "--merge-file",
        mf,
        "--append-eod",
    ]
    assert preprocess_main(argv) == 0
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vf, merge_file=mf)
    ds = IndexedDataset(out + "_text_document")
    first = ds[0].tolist()
    assert first[-1] == tok.eod == tok.vocab_size - 1
    vocab = json.loads(Path(vf).read_text(encoding="utf-8"))
    assert vocab["\u0120the"] in first and vocab["\u0120cat"] in first  # merges applied
    assert tok.detokenize(ds[1].tolist()[:-1]) == "théâtre ✓"


BAD_CASES = [
    (b'{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: missing key 'text'"),
    (b'{"text": 5}\n', r"bad\.jsonl:1: key 'text' holds int, expected a string"),
    (b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:3: not valid UTF-8"),
    (b'["text"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
]


@pytest.mark.parametrize("content,message", BAD_CASES, ids=["json", "key", "type", "utf8", "object"])
def test_bad_lines_stop_with_file_line(assets, tmp_path, capsys, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    out_dir = tmp_path / "out"
    argv = [
        "--input",
        str(src),
        "--output-prefix",
        str(out_dir / "b"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        assets["model"],
        "--workers",
        "2",
        "--chunk-lines",
        "1",
    ]
    assert preprocess_main(argv) == 1
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert "--skip-bad-lines" in err
    assert _outputs(out_dir) == []


def test_skip_bad_lines_counts(assets, tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"".join(c for c, _ in BAD_CASES) + b'{"text": "the end"}\n')
    out = str(tmp_path / "m")
    argv = [
        "--input",
        str(src),
        "--output-prefix",
        out,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        assets["model"],
        "--skip-bad-lines",
    ]
    assert preprocess_main(argv) == 0
    text = capsys.readouterr().out
    assert "bad lines: 5" in text and "documents: 5" in text and "mixed.jsonl:2: not valid JSON" in text
    assert IndexedDataset(out + "_text_document").num_documents == 5


def test_clear_errors_and_no_outputs(assets, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    cases = [
        (["--input", str(empty)], "the input is empty"),
        (["--input", str(tmp_path / "missing*.jsonl")], "no file matches"),
        (
            ["--tokenizer-model", str(tmp_path / "nope.model")],
            "nope.model: sentencepiece model file not found",
        ),
        (["--output-prefix", str(empty / "sub" / "x")], "cannot create output directory"),
    ]
    for extra, message in cases:
        argv = _sp_args(assets, str(tmp_path / "o" / "x"))
        for i in range(0, len(extra), 2):
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        assert preprocess_main(argv) == 1
        err = capsys.readouterr().err
        assert message in err, (message, err)
    only_empty = tmp_path / "blank.jsonl"
    only_empty.write_text(json.dumps({"text": ""}) + "\n")
    assert preprocess_main(_sp_args({**assets, "corpus": str(only_empty)}, str(tmp_path / "o" / "x"))) == 1
    assert "no non-empty documents" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or _outputs(tmp_path / "o") == []


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_cli_interrupt_leaves_no_complete_pair(assets, tmp_path, how):
    """SIGKILL mid-run leaves at most temporary files, never a .bin/.idx pair; SIGTERM leaves nothing."""
    big = tmp_path / "big.jsonl"
    big.write_text(Path(assets["corpus"]).read_text() * 300)
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "tools/preprocess_data.py"),
            *_sp_args({**assets, "corpus": str(big)}, str(out_dir / "x")),
            "--workers",
            "2",
            "--chunk-lines",
            "8",
            "--log-interval",
            "100",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "docs/s" in proc.stderr.readline()  # first progress line: the run is under way
    getattr(proc, how)()
    _, err = proc.communicate(timeout=60)
    names = os.listdir(out_dir) if out_dir.exists() else []
    assert "x_text_document.idx" not in names and "x_text_document.bin" not in names
    if how == "terminate":
        assert proc.returncode == 130 and "interrupted: no output was written" in err
        assert names == []


def test_merge_tool(assets, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = Path(assets["corpus"]).read_text().splitlines(keepends=True)
    a.write_text("".join(lines[:50]))
    b.write_text("".join(lines[50:]))
    for name, src in (("a", a), ("b", b), ("all", assets["corpus"])):
        assert (
            preprocess_main(_sp_args({**assets, "corpus": str(src)}, str(tmp_path / name), "--append-eod"))
            == 0
        )
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools/merge_datasets.py"),
            "--input",
            str(tmp_path / "a_text_document"),
            str(tmp_path / "b_text_document"),
            "--output-prefix",
            str(tmp_path / "ab_text_document"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "120 documents" in r.stdout
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ab_text_document{ext}").read_bytes() == (
            tmp_path / f"all_text_document{ext}"
        ).read_bytes()


def test_build_demo_corpus_is_deterministic(tmp_path):
    outs = []
    for k in range(2):
        path = tmp_path / f"demo{k}.jsonl"
        r = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools/build_demo_corpus.py"),
                "--output",
                str(path),
                "--max-docs",
                "300",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]
    docs = [json.loads(x) for x in outs[0].decode().splitlines()]
    assert len(docs) == 300 and all(len(d["text"]) >= 64 and d["source"] for d in docs)
    assert np.mean([len(d["text"]) for d in docs]) > 100
