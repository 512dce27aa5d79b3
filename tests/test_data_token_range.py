"""megatron_ki/data/token_range.py: the largest token id of a dataset, from its sidecar or a cached scan."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_ki.data import indexed as ix
from megatron_ki.data import token_range as tr
from megatron_ki.data.indexed import (
    IndexedDatasetBuilder,
    merge_datasets,
    read_stats,
    stats_path,
    write_stats,
)
from megatron_ki.data.token_range import (
    TokenRangeError,
    cache_path,
    check_token_range,
    dataset_prefixes,
    max_token_id,
    token_stats,
)
from megatron_ki.errors import MegatronKIError


def _write(prefix, docs, dtype=np.uint16, sidecar: bool = False) -> IndexedDatasetBuilder:
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
    if sidecar:
        write_stats(str(prefix), {**b.token_stats(), "source": "test"})
    return b


def _no_scan(monkeypatch):
    def fail(prefix):
        raise AssertionError(f"{prefix} was scanned")

    monkeypatch.setattr(tr, "scan_token_stats", fail)


def _rewrite_bin(prefix, values, dtype=np.uint16) -> None:
    """Overwrite the .bin in place with tokens of the same size (as another tool would), new mtime."""
    path = ix.bin_path(prefix)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(np.asarray(values, dtype=dtype).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_builder_records_the_range_and_the_sidecar_is_used(tmp_path, monkeypatch):
    prefix = tmp_path / "a"
    b = _write(prefix, [[5, 9, 2], [7], [300, 1]], sidecar=True)
    assert (b.min_token_id, b.max_token_id, b.token_count) == (1, 300, 6)
    record = json.loads((tmp_path / "a.stats.json").read_text())
    assert record["max_token_id"] == 300 and record["num_tokens"] == 6 and record["dtype"] == "uint16"
    assert record["bin_size"] == os.path.getsize(tmp_path / "a.bin")
    _no_scan(monkeypatch)
    assert max_token_id(str(prefix), None) == 300
    check_token_range([str(prefix)], 301, None)


def test_scan_without_sidecar_is_cached_beside_the_data(tmp_path, monkeypatch):
    prefix = str(tmp_path / "m")
    _write(prefix, [[3, 4], [70000 - 1, 2]] * 3, np.int32)
    monkeypatch.setattr(tr, "_SCAN_BYTES", 8)  # two tokens per chunk: several chunks
    assert not os.path.exists(stats_path(prefix))
    stats = token_stats(prefix, None)
    assert (stats["max_token_id"], stats["min_token_id"], stats["num_tokens"]) == (69999, 2, 12)
    assert read_stats(prefix)["source"] == "scan"
    _no_scan(monkeypatch)
    assert max_token_id(prefix, None) == 69999


def test_scan_cached_in_cache_dir_and_rescanned_when_the_bin_changes(tmp_path, monkeypatch):
    prefix = str(tmp_path / "data" / "x")
    os.makedirs(tmp_path / "data")
    _write(prefix, [[1, 2, 3], [4, 5]])
    cache = str(tmp_path / "cache")
    assert max_token_id(prefix, cache) == 5
    assert os.listdir(cache) == [os.path.basename(cache_path(prefix, cache))]
    assert not os.path.exists(stats_path(prefix))  # with a cache_dir nothing is written beside the data
    _rewrite_bin(prefix, [1, 2, 3, 4, 600])  # same size, new content and mtime
    assert max_token_id(prefix, cache) == 600
    with pytest.raises(TokenRangeError):
        check_token_range([prefix], 512, cache)


def test_stale_sidecar_is_ignored(tmp_path):
    """A dataset rewritten in place by a tool that knows no sidecar: the old sidecar must not be trusted."""
    prefix = str(tmp_path / "s")
    _write(prefix, [[1, 2], [3]], sidecar=True)
    assert max_token_id(prefix) == 3
    _rewrite_bin(prefix, [1, 2, 999])
    assert read_stats(prefix) is None
    assert max_token_id(prefix) == 999
    assert read_stats(prefix)["max_token_id"] == 999  # the new scan replaced it


def test_publishing_a_new_pair_removes_the_old_sidecar(tmp_path):
    prefix = str(tmp_path / "p")
    _write(prefix, [[1, 2]], sidecar=True)
    _write(prefix, [[7, 8]])
    assert not os.path.exists(stats_path(prefix))
    assert max_token_id(prefix) == 8


def test_unwritable_data_dir_just_does_not_cache(tmp_path, monkeypatch):
    prefix = str(tmp_path / "r")
    _write(prefix, [[4, 2]])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", stats_path(prefix))

    monkeypatch.setattr(tr, "write_stats", refuse)
    assert max_token_id(prefix) == 4
    assert not os.path.exists(stats_path(prefix))


def test_error_message_names_dataset_id_and_vocab(tmp_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    _write(good, [[1, 511]], sidecar=True)
    _write(bad, [[1, 600, 3]])
    check_token_range([good], 512)
    with pytest.raises(TokenRangeError) as e:
        check_token_range([good, bad], 512, str(tmp_path / "cache"))
    assert isinstance(e.value, MegatronKIError) and e.value.exit_code == 1
    assert str(e.value).startswith(
        f"data.data_path: {bad} holds token id 600, but model.vocab_size is 512 (ids must be < 512)"
    )
    assert "\n" not in str(e.value)
    neg = str(tmp_path / "neg")
    _write(neg, [[5, -3]], np.int32)
    with pytest.raises(TokenRangeError, match=r"holds token id -3, but token ids must be >= 0"):
        check_token_range([neg], 512)


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "e")
    _write(prefix, [])
    assert max_token_id(prefix) == -1
    check_token_range([prefix], 1)


def test_merge_records_the_range_from_sidecars_and_scans(tmp_path, monkeypatch):
    a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "ab")
    _write(a, [[1, 2], [40]], sidecar=True)  # copied as bytes, range from the sidecar
    _write(b, [[3, 250]])  # no sidecar: range found while copying
    merged = merge_datasets([a, b], out, stats={"source": "test"})
    assert merged.num_tokens == 5
    record = read_stats(out)
    assert (record["min_token_id"], record["max_token_id"], record["num_tokens"]) == (1, 250, 5)
    _no_scan(monkeypatch)
    assert max_token_id(out) == 250


def test_dataset_prefixes():
    from megatron_ki.config import DataConfig

    assert dataset_prefixes(["/d/x"]) == ["/d/x"]
    assert dataset_prefixes("0.3 /d/a 0.7 /d/b") == ["/d/a", "/d/b"]
    assert dataset_prefixes(DataConfig(data_path=[0.3, "/d/a", 0.7, "/d/b"])) == ["/d/a", "/d/b"]


def test_preprocess_writes_the_sidecar(tmp_path):
    """tools/preprocess_data.py records the largest id of what it wrote (the same a scan finds)."""
    from megatron_ki.data.preprocess import main as preprocess_main
    from tests.test_data_utils import make_corpus, train_sp

    model = train_sp(str(tmp_path), vocab_size=120)
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, n_docs=60, seed=1)
    out = str(tmp_path / "o" / "x")
    argv = ["--input", corpus, "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer"]
    assert preprocess_main([*argv, "--tokenizer-model", model, "--append-eod", "--partitions", "1"]) == 0
    prefix = out + "_text_document"
    record = read_stats(prefix)
    assert record["source"] == "preprocess_data.py" and record["vocab_size"] == 120
    assert record["tokenizer_model"] == os.path.abspath(model)
    scanned = tr.scan_token_stats(prefix)
    assert record["max_token_id"] == scanned["max_token_id"] and record["num_tokens"] == scanned["num_tokens"]
    check_token_range([prefix], 120)
    with pytest.raises(TokenRangeError, match=f"{prefix} holds token id {record['max_token_id']}"):
        check_token_range([prefix], record["max_token_id"])
