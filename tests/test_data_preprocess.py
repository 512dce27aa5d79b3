"""tools/preprocess_data.py, train_tokenizer.py, merge_datasets.py, build_demo_corpus.py end to end."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
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
    assert (tok.mask, tok.pad, tok.piece_to_id("<eod>")) == (3, 4, 5)  # user symbols follow <unk>, <s>, </s>
    assert tok.cls == tok.bos == 1 and tok.sep == tok.eos == 2
    assert tok.eod == tok.eos  # the separator Megatron-LM appends; <eod> only with --eod-token '<eod>'
    assert tok.special_ids == [0, 1, 2, 3, 4, 5]  # <eod> stays special (never masked)
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


def _start_big_run(assets, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """tools/preprocess_data.py on a 300x corpus into ``<tmp>/out/x``, returned once its first progress line
    is out: the run is under way and its temporary files exist."""
    big = tmp_path / "big.jsonl"
    big.write_text(Path(assets["corpus"]).read_text() * 300)
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "tools/preprocess_data.py"),
            *_sp_args({**assets, "corpus": str(big)}, str(out_dir / "x")),
            *extra,
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
    assert "docs/s" in proc.stderr.readline()
    return proc, out_dir


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_cli_interrupt_leaves_no_complete_pair(assets, tmp_path, how):
    """SIGKILL mid-run leaves at most temporary files, never a .bin/.idx pair; SIGTERM leaves nothing."""
    proc, out_dir = _start_big_run(assets, tmp_path, "--workers", "2")
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


# ------------------------------------------------------------------ failures keep what exists
@pytest.mark.parametrize("partitions", [1, 2])
def test_no_documents_keeps_the_existing_dataset(assets, tmp_path, capsys, partitions):
    out = str(tmp_path / "o" / "x")
    assert preprocess_main(_sp_args(assets, out)) == 0
    before = {n: (tmp_path / "o" / n).read_bytes() for n in _outputs(tmp_path / "o")}
    assert sorted(before) == ["x_text_document.bin", "x_text_document.idx"]
    blanks = []
    for i in range(partitions):
        blank = tmp_path / f"blank{i}.jsonl"
        blank.write_text(json.dumps({"text": ""}) + "\n")
        blanks.append(str(blank))
    argv = _sp_args(assets, out, "--partitions", str(partitions))
    argv[argv.index("--input") + 1 : argv.index("--input") + 2] = blanks
    capsys.readouterr()
    assert preprocess_main(argv) == 1
    assert "no non-empty documents found" in capsys.readouterr().err
    assert {n: (tmp_path / "o" / n).read_bytes() for n in _outputs(tmp_path / "o")} == before


def test_rerun_after_kill_removes_stale_temp_files(assets, tmp_path):
    """kill -9 leaves temporary files (nothing can remove them then); the next run of the prefix does."""
    proc, out_dir = _start_big_run(assets, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    left = _outputs(out_dir)
    assert left and all(f".tmp-{proc.pid}" in n for n in left), left
    assert preprocess_main(_sp_args(assets, str(out_dir / "x"))) == 0
    assert _outputs(out_dir) == ["x_text_document.bin", "x_text_document.idx"]


def test_json_error_says_at_column_once():
    from megatron_ki.data.corpus import parse_json_line

    for raw in (b'{"text": "broken', b'{"text": "a\x01b"}', b"{bad"):
        texts, reason = parse_json_line(raw, ["text"])
        assert texts is None and "at at" not in reason and " at column " in reason, reason
    assert parse_json_line(b'{"text": "broken', ["text"])[1] == (
        "not valid JSON (Unterminated string starting at column 10)"
    )


# ------------------------------------------------------------------ merge_datasets.py refusals
def _merge_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "merge_datasets", os.path.join(ROOT, "tools/merge_datasets.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_merge_tool_names_the_missing_file(tmp_path, capsys):
    from megatron_ki.data.indexed import IndexedDatasetBuilder

    for name in ("a", "b"):
        with IndexedDatasetBuilder(str(tmp_path / name), np.uint16) as b:
            b.add_document([1, 2, 3])
    merge = _merge_tool()
    out = ["--output-prefix", str(tmp_path / "ab")]
    (tmp_path / "b.idx").unlink()
    assert merge(["--input", str(tmp_path / "a"), str(tmp_path / "b"), *out]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"merge_datasets.py: error: dataset {tmp_path / 'b'}: {tmp_path / 'b.idx'} not found ({tmp_path / 'b.bin'} is there; expected both files)"
    )
    (tmp_path / "a.bin").unlink()
    assert merge(["--input", str(tmp_path / "a"), *out]) == 1
    assert f"{tmp_path / 'a.bin'} not found" in capsys.readouterr().err
    assert merge(["--input", str(tmp_path / "c"), *out]) == 1
    assert f"neither {tmp_path / 'c.bin'} nor {tmp_path / 'c.idx'} found" in capsys.readouterr().err
    assert not (tmp_path / "ab.bin").exists() and not (tmp_path / "ab.idx").exists()


def test_merge_tool_vocab_size_refuses_ids_of_another_vocabulary(tmp_path, capsys):
    from megatron_ki.data.indexed import IndexedDatasetBuilder

    for name, ids in (("small", [1, 2, 299]), ("big", [1, 400, 2])):  # both uint16: the dtype cannot tell
        with IndexedDatasetBuilder(str(tmp_path / name), np.uint16) as b:
            b.add_document(ids)
    merge = _merge_tool()
    argv = ["--input", str(tmp_path / "small"), str(tmp_path / "big"), "--output-prefix", str(tmp_path / "m")]
    assert merge([*argv, "--vocab-size", "300"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'big'}.bin: token id 400 is outside the vocabulary of 300 tokens" in err
    assert sorted(os.listdir(tmp_path)) == ["big.bin", "big.idx", "small.bin", "small.idx"]
    assert merge([*argv, "--vocab-size", "401"]) == 0
    assert IndexedDataset(str(tmp_path / "m")).document(1)[0].tolist() == [1, 400, 2]


# ------------------------------------------------------------------ pool shutdown
_SIGTERM_AFTER_FORK: dict = {"pids": None}


def _sigterm_self_after_fork() -> None:
    """In a child forked while the test asks for it: note the PID, then SIGTERM itself at once (as
    ``pool.terminate()`` does to a worker that is still starting when a short run is already over)."""
    if _SIGTERM_AFTER_FORK["pids"] is not None:
        with open(_SIGTERM_AFTER_FORK["pids"], "a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGTERM)


os.register_at_fork(after_in_child=_sigterm_self_after_fork)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method and /proc")
def test_pool_worker_dies_of_a_sigterm_received_while_starting(assets, tmp_path):
    """Such a SIGTERM used to reach the handler inherited from main() inside an at-fork hook, where Python
    ignores the KeyboardInterrupt it raises: the worker lived on and pool.join() waited forever."""
    import multiprocessing

    from megatron_ki.data import preprocess as pre

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)  # what main() installs while it runs
    init = (("SentencePieceTokenizer", assets["model"], None, None), ["text"], False, "uint16", False)
    pids_file = tmp_path / "pids"
    _SIGTERM_AFTER_FORK["pids"] = str(pids_file)
    try:
        pool = pre._start_pool(multiprocessing.get_context("fork"), 1, init)
    finally:
        _SIGTERM_AFTER_FORK["pids"] = None
        signal.signal(signal.SIGTERM, previous)
    try:
        deadline = time.monotonic() + 60
        while (
            not (pids_file.exists() and pids_file.read_text().endswith("\n")) and time.monotonic() < deadline
        ):
            time.sleep(0.05)  # the child writes its PID after the fork, at its own pace
        pids = [int(x) for x in pids_file.read_text().split()]
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in pids if _alive(p)]
        assert not alive, f"worker(s) {alive} survived the SIGTERM they received while starting"
    finally:
        pool.terminate()
        pool.join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a dead worker not yet reaped by the pool is a zombie
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_failure_on_the_second_key_keeps_both_existing_datasets(assets, tmp_path, capsys, monkeypatch):
    """With several --json-keys, every index is written before any output replaces an existing one."""
    from megatron_ki.data import indexed as ix

    src = tmp_path / "two_keys.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"the cat {i}", "title": f"a dog {i}"}) + "\n" for i in range(9))
    )
    out = str(tmp_path / "o" / "x")
    argv = [*_sp_args({**assets, "corpus": str(src)}, out), "--json-keys", "text", "title"]
    assert preprocess_main(argv) == 0
    before = {n: (tmp_path / "o" / n).read_bytes() for n in _outputs(tmp_path / "o")}
    assert len(before) == 4
    src.write_text(
        "".join(json.dumps({"text": f"quick fox {i}", "title": "lazy river"}) + "\n" for i in range(5))
    )
    real_copy, calls = ix.shutil.copyfileobj, []

    def copy_until_the_disk_is_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two copies per index: the first one of the second key's index
            raise OSError(28, "No space left on device")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(ix.shutil, "copyfileobj", copy_until_the_disk_is_full)
    capsys.readouterr()
    assert preprocess_main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {n: (tmp_path / "o" / n).read_bytes() for n in _outputs(tmp_path / "o")} == before


def test_sample_lines_is_seeded_and_uniform():
    from megatron_ki.data.train_tokenizer import sample_lines

    lines = [str(i) for i in range(1000)]
    assert sample_lines(iter(lines[:7]), 10, seed=0) == lines[:7]  # a short stream: every line, in order
    a = sample_lines(iter(lines), 100, seed=0)
    assert a == sample_lines(iter(lines), 100, seed=0) and len(set(a)) == 100
    assert a != sample_lines(iter(lines), 100, seed=1)
    counts = np.zeros(20)
    for seed in range(400):  # each of 20 lines kept with probability 5/20 = 0.25
        for x in sample_lines(iter(lines[:20]), 5, seed):
            counts[int(x)] += 1
    assert np.all(np.abs(counts / 400 - 0.25) < 0.08), counts / 400


def test_train_tokenizer_sampled_corpus_is_reproducible(tmp_path):
    """A corpus larger than --sample-size gives the same pieces in every process with the same seed
    (sentencepiece's own sampling did not: each process trained another tokenizer)."""
    import sentencepiece as spm

    rng = np.random.default_rng(5)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 9))) for _ in range(3000)]
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as f:  # 3000 lines of words drawn from a long tail: the sample decides the merges
        for _ in range(3000):
            picks = rng.zipf(1.3, size=12) % len(words)
            f.write(json.dumps({"text": " ".join(words[i] for i in picks)}) + "\n")
    pieces = []
    for run in range(2):
        prefix = tmp_path / f"t{run}"
        cmd = [sys.executable, os.path.join(ROOT, "tools/train_tokenizer.py"), "--input", str(corpus)]
        cmd += ["--model-prefix", str(prefix), "--vocab-size", "400", "--sample-size", "300"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
        pieces.append([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    assert pieces[0] == pieces[1]
