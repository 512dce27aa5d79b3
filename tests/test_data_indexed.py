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
    with pytest.raises(
        IndexedDatasetError, match=r"g\.bin: size 14 bytes does not match the index .*g\.idx.*not one pair"
    ):
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


# ------------------------------------------------------------------ temporary files and publication
def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    """A new writer of a prefix removes what killed writers of that prefix left, nothing of anyone else."""
    import subprocess
    import sys

    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [  # this host's dead writer, and the names of earlier versions (no host)
            f"ds.bin{ix.temp_tag(dead)}",
            f"ds.idx{ix.temp_tag(dead)}",
            f"ds.idx{ix.temp_tag(dead)}.lengths",
            f"ds.idx{ix.temp_tag(dead)}.docs",
        ]
        kept = [
            f"ds.bin{ix.temp_tag(live.pid)}",  # a live writer
            f"ds.idx{ix.temp_tag(live.pid)}.docs",
            f"ds.bin{ix.temp_tag(dead, host='other-node')}",  # a writer on another host: cannot be checked
            f"ds2.bin{ix.temp_tag(dead)}",  # another prefix
            f"ds.part000.bin{ix.temp_tag(dead)}",
            f"ds.bin.tmp-{dead}.bak",  # not a name the builder writes
        ]
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"x")
        _write(str(tmp_path / "ds"), [[[1, 2]]])
        assert sorted(os.listdir(tmp_path)) == sorted([*kept, "ds.bin", "ds.idx"])
        assert IndexedDataset(str(tmp_path / "ds"))[0].tolist() == [1, 2]
    finally:
        live.kill()
        live.wait()


def test_stale_temp_files_of_earlier_versions_are_removed(tmp_path):
    """Names without a host (``.tmp-PID``, as written before) are this host's: removed once the PID is gone."""
    import subprocess
    import sys

    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [
            f"ds.bin.tmp-{dead}",
            f"ds.idx.tmp-{dead}",
            f"ds.idx.tmp-{dead}.lengths",
            f"ds.idx.tmp-{dead}.docs",
        ]
        kept = [f"ds.bin.tmp-{live.pid}", f"ds.idx.tmp-{live.pid}.docs", f"other.bin.tmp-{dead}"]
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"x")
        _write(str(tmp_path / "ds"), [[[1, 2]]])
        assert sorted(os.listdir(tmp_path)) == sorted([*kept, "ds.bin", "ds.idx"])
    finally:
        live.kill()
        live.wait()


class _FullDisk:
    """A file whose writes and final flush fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        raise OSError(28, "No space left on device")


def test_disk_full_leaves_no_temp_files(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(OSError, match="No space"), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b._bin = _FullDisk(b._bin)
        b.add_item([1, 2, 3])
    assert os.listdir(tmp_path) == []


def test_failed_finalize_leaves_no_temp_files_and_keeps_the_old_dataset(tmp_path, monkeypatch):
    prefix = str(tmp_path / "x")
    _write(prefix, [[[7, 8, 9]]])
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ix.shutil, "copyfileobj", full)  # writing the new index fails
    with pytest.raises(OSError, match="No space"):
        _write(prefix, [[[1, 2]]])
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def _pair(prefix: str, which: int) -> None:
    """Pair A (which=1): lengths [3, 5], all tokens 1; pair B (which=2): lengths [5, 3], all tokens 2.
    Same file sizes, so only the order of publication and the reader's checks keep them apart."""
    lengths = [3, 5] if which == 1 else [5, 3]
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for n in lengths:
            b.add_document([which] * n)


def _consistent(ds: IndexedDataset) -> bool:
    which = 1 if int(ds.sizes[0]) == 3 else 2
    return all(set(ds[i].tolist()) == {which} for i in range(len(ds)))


def test_publication_removes_the_old_index_before_the_new_bin(tmp_path, monkeypatch):
    """Between the two renames a reader must find no index rather than the old index beside the new .bin."""
    prefix = str(tmp_path / "p")
    _pair(prefix, 1)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst).endswith(".bin"):
            seen.append(os.path.exists(prefix + ".idx"))
        return real_replace(src, dst)

    monkeypatch.setattr(ix.os, "replace", replace)
    _pair(prefix, 2)
    assert seen == [False], "the old .idx was still there when the new .bin was published"
    assert _consistent(IndexedDataset(prefix)) and IndexedDataset(prefix)[0].tolist() == [2] * 5


def test_reader_never_pairs_an_index_with_another_bin(tmp_path, monkeypatch):
    """A writer publishes a new pair while a reader is opening the old one (between its index and .bin):
    the reader ends up with one consistent pair, never the old index over the new tokens."""
    prefix = str(tmp_path / "p")
    _pair(prefix, 1)
    real_memmap = np.memmap
    calls = []

    def memmap(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the reader has mapped the index, not yet the data: publish pair B now
            monkeypatch.setattr(ix.np, "memmap", real_memmap)
            _pair(prefix, 2)
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(ix.np, "memmap", memmap)
    ds = IndexedDataset(prefix)
    assert len(calls) == 2
    assert _consistent(ds), (ds.sizes.tolist(), [ds[i].tolist() for i in range(len(ds))])


def test_reader_opens_again_when_the_pair_is_replaced_while_opening(tmp_path, monkeypatch):
    prefix = str(tmp_path / "p")
    _pair(prefix, 1)
    real_open = open
    state = {"done": False}

    def hooked_open(path, *args, **kwargs):
        if not state["done"] and os.fspath(path).endswith(".bin") and "r" in (args[0] if args else "r"):
            state["done"] = True  # the reader holds the old index: a writer publishes pair B
            _pair(prefix, 2)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ix, "open", hooked_open, raising=False)
    ds = IndexedDataset(prefix)
    assert state["done"]
    assert _consistent(ds) and ds[0].tolist() == [2] * 5
