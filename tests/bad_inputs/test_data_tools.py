"""Bad inputs of the data tools and the run reports: one error line naming the culprit, no traceback, the right
exit code, nothing half-written, and existing outputs (a dataset, a tokenizer) kept as they were."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_ki.data.indexed import IndexedDatasetBuilder, write_stats
from tests.bad_inputs.harness import BadInput, check, run_all, tool

ASSETS: dict[str, Path] = {}
"""Filled once per module by the fixture: a tiny sentencepiece model and a corpus, copied by the cases."""

PP = "preprocess_data.py: error:"
TT = "train_tokenizer.py: error:"
MERGE = "merge_datasets.py: error:"
DATASET = ("out/x_text_document.bin", "out/x_text_document.idx", "out/x_text_document.stats.json")


# ------------------------------------------------------------------------------------------------ inputs
def _corpus(folder: Path, name: str = "c.jsonl") -> Path:
    path = folder / name
    shutil.copy(ASSETS["corpus"], path)
    return path


def _model(folder: Path) -> Path:
    path = folder / "tok.model"
    shutil.copy(ASSETS["model"], path)
    return path


def _gz(folder: Path) -> Path:
    path = folder / "c.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(Path(ASSETS["corpus"]).read_bytes())
    return path


def _truncated_gz(folder: Path) -> Path:
    data = _gz(folder).read_bytes()
    path = folder / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_gzip(folder: Path) -> Path:
    path = folder / "plain.jsonl.gz"
    shutil.copy(ASSETS["corpus"], path)
    return path


def _dataset(prefix: Path, docs: list[list[int]], dtype=np.uint16, **stats) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
    write_stats(str(prefix), {**b.token_stats(), **stats})


def _existing_dataset(folder: Path) -> None:
    """The dataset a failing preprocess run must leave as it was."""
    _dataset(folder / "out" / "x_text_document", [[5, 6, 7], [8]], source="earlier run")


def _unwritable_dir(folder: Path) -> str:
    """A directory this process cannot create files in (root ignores permissions: then a sysfs directory)."""
    ro = folder / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    for candidate in (str(ro), "/sys/kernel"):
        try:
            with open(os.path.join(candidate, "probe"), "wb"):
                pass
        except OSError:
            return candidate
        os.remove(os.path.join(candidate, "probe"))
    raise RuntimeError("no unwritable directory available")


# ------------------------------------------------------------------------------------------ preprocess
def pp(folder: Path, *extra: str, model: str | None = None, inp: str | None = None) -> list[str]:
    model = model or str(_model(folder))
    inp = inp or str(_corpus(folder))
    args = ["--input", inp, "--output-prefix", "out/x", "--tokenizer-type", "SentencePieceTokenizer"]
    return tool("tools/preprocess_data.py", *args, "--tokenizer-model", model, *extra)


def pp_zero_model(folder: Path) -> list[str]:
    (folder / "zero.model").write_bytes(b"")
    return pp(folder, model="zero.model")


def pp_corrupt_model(folder: Path) -> list[str]:
    (folder / "junk.model").write_bytes(bytes(range(256)) * 3)
    return pp(folder, model="junk.model")


def pp_truncated_gz(folder: Path) -> list[str]:
    _existing_dataset(folder)
    return pp(folder, "--workers", "2", "--chunk-lines", "16", inp=str(_truncated_gz(folder).name))


def pp_not_gzip(folder: Path) -> list[str]:
    return pp(folder, inp=_not_gzip(folder).name)


def pp_missing_input(folder: Path) -> list[str]:
    return pp(folder, inp="nope.jsonl")


def pp_missing_tokenizer(folder: Path) -> list[str]:
    return pp(folder, model="nope.model")


def pp_unwritable_output(folder: Path) -> list[str]:
    return [*pp(folder), "--output-prefix", os.path.join(_unwritable_dir(folder), "x")]


def pp_output_under_a_file(folder: Path) -> list[str]:
    (folder / "afile").write_text("x")
    return [*pp(folder), "--output-prefix", "afile/sub/x"]


def pp_bad_json_keeps_dataset(folder: Path) -> list[str]:
    _existing_dataset(folder)
    (folder / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    return pp(folder, inp="bad.jsonl")


def pp_unknown_json_key(folder: Path) -> list[str]:
    return pp(folder, "--json-keys", "body")


def pp_empty_input(folder: Path) -> list[str]:
    (folder / "empty.jsonl").write_bytes(b"")
    return pp(folder, inp="empty.jsonl")


def pp_zero_workers(folder: Path) -> list[str]:
    return pp(folder, "--workers", "0")


def pp_eod_token_unknown_piece_keeps_dataset(folder: Path) -> list[str]:
    _existing_dataset(folder)
    return pp(folder, "--append-eod", "--eod-token", "<EOD>")


def pp_eod_token_id_out_of_range(folder: Path) -> list[str]:
    return pp(folder, "--append-eod", "--eod-token", "64")


def pp_eod_token_without_append_eod(folder: Path) -> list[str]:
    return pp(folder, "--eod-token", "</s>")


# ------------------------------------------------------------------------------------- train_tokenizer
def tt(folder: Path, inp: str, *extra: str) -> list[str]:
    args = ["--input", inp, "--model-prefix", "tk", "--vocab-size", "60", "--num-threads", "1"]
    return tool("tools/train_tokenizer.py", *args, "--sample-size", "0", *extra)


def tt_empty_input(folder: Path) -> list[str]:
    (folder / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    return tt(folder, "empty.jsonl")


def tt_truncated_gz_keeps_tokenizer(folder: Path) -> list[str]:
    shutil.copy(ASSETS["model"], folder / "tk.model")  # an earlier tokenizer at --model-prefix
    return tt(folder, _truncated_gz(folder).name)


def tt_not_gzip(folder: Path) -> list[str]:
    return tt(folder, _not_gzip(folder).name)


def tt_missing_input(folder: Path) -> list[str]:
    return tt(folder, "nope.jsonl")


def tt_unwritable_output(folder: Path) -> list[str]:
    return [*tt(folder, _corpus(folder).name), "--model-prefix", os.path.join(_unwritable_dir(folder), "tk")]


def tt_vocab_too_large(folder: Path) -> list[str]:
    return tt(folder, _corpus(folder).name, "--vocab-size", "5000")


# ----------------------------------------------------------------------------------------------- merge
def merge(*args: str) -> list[str]:
    return tool("tools/merge_datasets.py", "--input", "a", "b", "--output-prefix", "ab", *args)


def merge_missing_idx(folder: Path) -> list[str]:
    _dataset(folder / "a", [[1, 2]])
    _dataset(folder / "b", [[3]])
    (folder / "b.idx").unlink()
    return merge()


def merge_different_dtypes(folder: Path) -> list[str]:
    _dataset(folder / "a", [[1, 2]])
    _dataset(folder / "b", [[3, 70000]], np.int32)
    return merge()


def merge_different_vocabularies(folder: Path) -> list[str]:
    _dataset(folder / "a", [[1, 2]], tokenizer_type="SentencePieceTokenizer", vocab_size=300)
    _dataset(folder / "b", [[3]], tokenizer_type="SentencePieceTokenizer", vocab_size=400)
    return merge()


def merge_different_separators(folder: Path) -> list[str]:
    _dataset(folder / "a", [[1, 2]], eod_token_id=2)
    _dataset(folder / "b", [[3, 5]], eod_token_id=5)
    return merge()


def merge_ids_outside_vocab(folder: Path) -> list[str]:
    _dataset(folder / "a", [[1, 2]])
    _dataset(folder / "b", [[3, 400]])
    return merge("--vocab-size", "300")


def merge_cut_bin(folder: Path) -> list[str]:
    _dataset(folder / "a", [[1, 2], [3, 4]])
    _dataset(folder / "b", [[3]])
    with open(folder / "a.bin", "r+b") as f:
        f.truncate(4)
    return merge()


# --------------------------------------------------------------------------------------------- reports
def plot_without_metrics(folder: Path) -> list[str]:
    (folder / "run").mkdir()
    return tool("tools/plot_runs.py", "run", "--out", "curves.png")


def plot_unknown_format(folder: Path) -> list[str]:
    return tool("tools/plot_runs.py", "run", "--out", "curves.xyz")


def ki_report_missing_run(folder: Path) -> list[str]:
    (folder / "scratch").mkdir()
    return tool("tools/ki_report.py", "--ki", "nope", "--scratch", "scratch", "--out", "o")


CASES = [
    BadInput("pp_zero_model", pp_zero_model, ("--tokenizer-model zero.model", "an empty file (0 bytes)", "expected a sentencepiece .model"), error_prefix=PP),
    BadInput("pp_corrupt_model", pp_corrupt_model, ("--tokenizer-model junk.model", "768 bytes that sentencepiece cannot parse", "expected a sentencepiece .model"), error_prefix=PP),
    BadInput("pp_truncated_gz", pp_truncated_gz, ("cut.jsonl.gz", "truncated gzip file", "expected a complete .gz"), keep=DATASET, error_prefix=PP),
    BadInput("pp_not_gzip", pp_not_gzip, ("plain.jsonl.gz", "not a gzip file", "gzip magic"), error_prefix=PP),
    BadInput("pp_missing_input", pp_missing_input, ("--input nope.jsonl", "not found"), error_prefix=PP),
    BadInput("pp_missing_tokenizer", pp_missing_tokenizer, ("--tokenizer-model nope.model", "not found"), error_prefix=PP),
    BadInput("pp_unwritable_output", pp_unwritable_output, ("--output-prefix", "is not writable"), error_prefix=PP),
    BadInput("pp_output_under_a_file", pp_output_under_a_file, ("--output-prefix afile/sub/x", "cannot create output directory"), error_prefix=PP),
    BadInput("pp_bad_json_keeps_dataset", pp_bad_json_keeps_dataset, ("bad.jsonl:2", "not valid JSON", "--skip-bad-lines"), keep=DATASET, error_prefix=PP),
    BadInput("pp_unknown_json_key", pp_unknown_json_key, ("c.jsonl:1", "missing key 'body'", "keys present"), error_prefix=PP),
    BadInput("pp_empty_input", pp_empty_input, ("--input empty.jsonl", "empty (0 bytes)"), error_prefix=PP),
    BadInput("pp_zero_workers", pp_zero_workers, ("--workers 0", "expected an integer >= 1"), exit_code=2, error_prefix=PP),
    BadInput("pp_eod_token_unknown_piece_keeps_dataset", pp_eod_token_unknown_piece_keeps_dataset, ("--eod-token '<EOD>'", "no such piece", "64 tokens", "expected a piece"), keep=DATASET, error_prefix=PP),
    BadInput("pp_eod_token_id_out_of_range", pp_eod_token_id_out_of_range, ("--eod-token 64", "outside the vocabulary", "[0, 64)"), error_prefix=PP),
    BadInput("pp_eod_token_without_append_eod", pp_eod_token_without_append_eod, ("--eod-token </s>", "only applies with --append-eod"), exit_code=2, error_prefix=PP),
    BadInput("tt_empty_input", tt_empty_input, ("--input empty.jsonl", "no text found", "expected at least one"), error_prefix=TT),
    BadInput("tt_truncated_gz_keeps_tokenizer", tt_truncated_gz_keeps_tokenizer, ("cut.jsonl.gz", "truncated gzip file"), keep=("tk.model",), error_prefix=TT),
    BadInput("tt_not_gzip", tt_not_gzip, ("plain.jsonl.gz", "not a gzip file"), error_prefix=TT),
    BadInput("tt_missing_input", tt_missing_input, ("--input nope.jsonl", "not found"), error_prefix=TT),
    BadInput("tt_unwritable_output", tt_unwritable_output, ("--model-prefix", "is not writable"), error_prefix=TT),
    BadInput("tt_vocab_too_large", tt_vocab_too_large, ("--vocab-size 5000", "too large", "<="), error_prefix=TT),
    BadInput("merge_missing_idx", merge_missing_idx, ("b.idx not found", "b.bin is there"), keep=("a.bin", "a.idx", "b.bin"), error_prefix=MERGE),
    BadInput("merge_different_dtypes", merge_different_dtypes, ("b.idx", "dtype int32 differs from uint16 of a.idx"), keep=("a.bin", "b.bin"), error_prefix=MERGE),
    BadInput("merge_different_vocabularies", merge_different_vocabularies, ("dataset b", "vocab_size is 400", "b.stats.json", "300"), error_prefix=MERGE),
    BadInput("merge_different_separators", merge_different_separators, ("b: eod_token_id 5", "b.stats.json", "a records 2", "one document separator"), error_prefix=MERGE),
    BadInput("merge_ids_outside_vocab", merge_ids_outside_vocab, ("b.bin", "token id 400", "vocabulary of 300"), error_prefix=MERGE),
    BadInput("merge_cut_bin", merge_cut_bin, ("a.bin", "does not match the index", "a.idx"), error_prefix=MERGE),
    BadInput("plot_without_metrics", plot_without_metrics, ("run/metrics.jsonl not found",), error_prefix="plot_runs.py: error:"),
    BadInput("plot_unknown_format", plot_unknown_format, ("--out curves.xyz", ".png"), exit_code=2, error_prefix="plot_runs.py: error:"),
    BadInput("ki_report_missing_run", ki_report_missing_run, ("run directory not found: nope",), error_prefix="ki_report.py: error:"),
]  # fmt: skip


def _no_output_files(folder: Path) -> list[str]:
    """Dataset or tokenizer files a failed run wrote (those the setup made are in ``keep``)."""
    names = {"ab.bin", "ab.idx", "ab.stats.json", "tk.model", "tk.vocab"}
    return [
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.name in names or p.parent.name == "out"
    ]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from megatron_ki.data.train_tokenizer import train_sentencepiece

    assets = tmp_path_factory.mktemp("bad_data_assets")
    corpus = assets / "c.jsonl"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "river", "bank", "sky"]
    rng = np.random.default_rng(0)
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n")
    ASSETS["corpus"] = corpus
    ASSETS["model"] = Path(train_sentencepiece(str(corpus), str(assets / "sp"), 64, sample_size=0))
    return run_all(CASES, tmp_path_factory.mktemp("bad_data"))


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_bad_input(outcomes, name):
    outcome = outcomes[name]
    check(outcome)
    kept = {str(Path(k)) for k in outcome.case.keep}
    left = [p for p in _no_output_files(outcome.folder) if p not in kept]
    assert not left, f"{name}: a failed run left outputs: {left}"
