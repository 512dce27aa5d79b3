"""MMIDIDX writer/reader: byte layout, validation messages, streaming merge."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron_ki.data import indexed as ix
from megatron_ki.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    merge_datasets,
)
from tests.test_data_utils import read_mmidx


def _write(prefix: str, docs: list[list[list[int]]], dtype=np.uint16) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for doc in docs:
            for seq in doc:
                b.add_item(seq)
            b.end_document()


def _random_docs(rng: np.random.Generator, n: int, vocab: int = 1000) -> list[list[list[int]]]:
    return [
        [rng.integers(0, vocab, rng.integers(0, 30)).tolist() for _ in range(rng.integers(1, 4))]
        for _ in range(n)
    ]


def test_round_trip_matches_independent_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 50)
    prefix = str(tmp_path / "ds")
    _write(prefix, docs)
    flat = [s for d in docs for s in d]
    ref = read_mmidx(prefix)
    assert ref["code"] == 8 and ref["seqs"] == flat
    assert ref["pointers"] == list(np.cumsum([0] + [2 * len(s) for s in flat[:-1]]))
    assert ref["doc_idx"] == list(np.cumsum([0] + [len(d) for d in docs]))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == len(flat) and ds.num_documents == len(docs)
    for i, s in enumerate(flat):
        assert ds[i].tolist() == s
    assert [x.tolist() for x in ds.document(3)] == docs[3]
    longest = int(np.argmax(ds.sizes))
    assert ds.get(longest, 1, 2).tolist() == flat[longest][1:3]
    with pytest.raises(IndexError, match="outside sequence"):
        ds.get(longest, 1, len(flat[longest]))
    assert isinstance(ds.sizes, np.ndarray) and not ds.sizes.flags.owndata  # zero-copy views of the mmap


def test_pickles_as_its_path(tmp_path):
    import pickle

    prefix = str(tmp_path / "p")
    _write(prefix, _random_docs(np.random.default_rng(4), 200))
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 500 < os.path.getsize(prefix + ".bin")
    again = pickle.loads(blob)
    assert len(again) == len(ds) and all(np.array_equal(again[i], ds[i]) for i in range(len(ds)))


def test_int32_and_chunked_pointers(tmp_path, monkeypatch):
    """Pointers are int64 running sums even when the index is assembled in many chunks."""
    monkeypatch.setattr(ix, "_CHUNK", 7)
    rng = np.random.default_rng(1)
    docs = _random_docs(rng, 40, vocab=100_000)
    prefix = str(tmp_path / "big")
    _write(prefix, docs, dtype=ix.optimal_dtype(100_000))
    ref = read_mmidx(prefix)
    flat = [s for d in docs for s in d]
    assert ref["code"] == 4 and ref["seqs"] == flat
    assert ref["pointers"] == list(np.cumsum([0] + [4 * len(s) for s in flat[:-1]]))
    assert ix.optimal_dtype(65499) is np.uint16 and ix.optimal_dtype(65500) is np.int32


def test_add_documents_fast_path_equals_item_path(tmp_path):
    lengths = np.array([3, 0, 5, 1], dtype=np.int32)
    tokens = np.arange(9, dtype=np.uint16)
    with IndexedDatasetBuilder(str(tmp_path / "a"), np.uint16) as b:
        b.add_documents(tokens, lengths)
    _write(str(tmp_path / "b"), [[[0, 1, 2]], [[]], [[3, 4, 5, 6, 7]], [[8]]])
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_item([1, 2, 3])
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "g")
    _write(prefix, [[[1, 2, 3]], [[4, 5]], [[6]]])
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic(good):
    _patch(good + ".idx", 0, b"XXXXXXX")
    with pytest.raises(IndexedDatasetError, match=r"g\.idx: bad magic"):
        IndexedDataset(good)


def test_wrong_version(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match=r"g\.idx: unsupported index version 2"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    _patch(good + ".idx", 17, struct.pack("<B", 9))
    with pytest.raises(IndexedDatasetError, match=r"g\.idx: unknown dtype code 9"):
        IndexedDataset(good)


def test_bin_size_mismatch(good):
    with open(good + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"g\.bin: size 14 bytes does not match the index"):
        IndexedDataset(good)


def test_truncated_idx(good):
    size = os.path.getsize(good + ".idx")
    with open(good + ".idx", "r+b") as f:
        f.truncate(size - 5)
    with pytest.raises(IndexedDatasetError, match=r"g\.idx: truncated index"):
        IndexedDataset(good)
    with open(good + ".idx", "r+b") as f:
        f.truncate(20)
    with pytest.raises(IndexedDatasetError, match=r"header alone is 34"):
        IndexedDataset(good)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.idx: index file not found"):
        IndexedDataset(str(tmp_path / "nope"))


def test_merge_keeps_documents(tmp_path):
    rng = np.random.default_rng(2)
    parts = [_random_docs(rng, n) for n in (5, 0, 7, 3)]
    prefixes = []
    for i, docs in enumerate(parts):
        p = str(tmp_path / f"p{i}")
        _write(p, docs)
        prefixes.append(p)
    out = merge_datasets(prefixes, str(tmp_path / "merged"))
    all_docs = [d for docs in parts for d in docs]
    assert out.num_documents == len(all_docs)
    for k, doc in enumerate(all_docs):
        assert [x.tolist() for x in out.document(k)] == doc
    ref = read_mmidx(str(tmp_path / "merged"))
    assert ref["doc_idx"][-1] == len(ref["lengths"])


def test_merge_rejects_mixed_dtypes(tmp_path):
    _write(str(tmp_path / "a"), [[[1]]], np.uint16)
    _write(str(tmp_path / "b"), [[[1]]], np.int32)
    with pytest.raises(ValueError, match=r"b\.idx: dtype int32 differs"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "c"))
    assert not (tmp_path / "c.idx").exists() and not (tmp_path / "c.bin").exists()
