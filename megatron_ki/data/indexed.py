"""Megatron's MMIDIDX v1 indexed dataset: a zero-copy reader over ``np.memmap`` and a streaming writer.

Byte layout of ``{prefix}.idx`` (little-endian): magic ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code
``<B``, sequence_count ``<Q``, document_count ``<Q`` (documents + 1), then int32 sequence_lengths, int64
sequence_pointers (byte offsets into ``.bin``) and int64 document_indices (0 ... sequence_count).
``{prefix}.bin`` holds the tokens back to back. Files written here are read by Megatron-LM and vice versa.

The writer keeps nothing per document in RAM: lengths and document boundaries are appended to side files
and the index is assembled in chunks at :meth:`IndexedDatasetBuilder.finalize`, so memory does not grow with
the corpus. Everything is written under temporary names and renamed only on success, so an interrupted run
never leaves a pair that looks complete.

Temporary files are ``{prefix}.bin.tmp-{pid}@{host}`` and ``{prefix}.idx.tmp-{pid}@{host}[.lengths|.docs]``.
A failed write (disk full, an exception, Ctrl-C, SIGTERM) removes them; a killed writer (``kill -9``, OOM,
power loss) cannot, so every new builder of the same prefix removes those whose writer is gone: written on
this host by a PID that is no longer alive (:func:`remove_stale_temp_files`). Files of a live writer, and of
a writer on another host sharing the file system (whose PID cannot be checked from here), are left alone.

Publishing a pair (two files cannot be renamed at once), ``.idx`` last:

1. the new ``.bin`` and ``.idx`` are complete and fsync'ed under their temporary names;
2. the old ``{prefix}.idx`` is removed, so from now on no reader can open the old index;
3. the new ``.bin`` replaces the old one;
4. the new ``.idx`` appears (rename), then the directory is fsync'ed.

A reader (:class:`IndexedDataset`) opens the ``.idx``, then the ``.bin``, then checks that ``{prefix}.idx``
is still the file it opened (same inode) and maps both from the open descriptors. If a writer published in
between, its step 2 came after the reader opened the index, so the path no longer names that file: the
reader sees it and opens the new pair again. Whichever it gets, an ``.idx`` and the ``.bin`` published
before it are always read together; between steps 2 and 4 a reader finds no index and says so. On top of
this, the reader checks that the ``.bin`` size is exactly what the index describes and names both files if
not (a pair copied or edited by hand). The files themselves stay byte-compatible with Megatron-LM's
MMIDIDX v1: nothing is added to them.

Optional sidecar ``{prefix}.stats.json`` (:func:`write_stats`, :func:`read_stats`): token count and the
smallest and largest token id, with the size and mtime of the ``.bin`` it describes; a sidecar that does not
match the ``.bin`` beside it (rewritten by another tool) is ignored. Publishing a new pair removes the old one.
Since this project's document-separator rule, the sidecars of preprocess_data.py and merge_datasets.py also
record ``eod_token_id``: the id appended after every document (null: none was appended). It is an added field,
not a new format: sidecars written before it stay valid and simply do not know the separator
(:func:`recorded_eod` counts them as unknown).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from megatron_ki.errors import MegatronKIError
from megatron_ki.fileio import atomic_write, fsync_dir

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}

_CHUNK = 1 << 20  # entries per chunk when streaming index arrays
_COPY_BYTES = 16 << 20  # bytes per chunk when copying or scanning a .bin

STATS_SUFFIX = ".stats.json"
STATS_VERSION = 1

log = logging.getLogger(__name__)


class IndexedDatasetError(MegatronKIError, ValueError):
    """An ``.idx``/``.bin`` pair is malformed; the message names the file and what was expected."""


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's rule: uint16 tokens when the vocabulary is under 65500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def stats_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}{STATS_SUFFIX}"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


# ------------------------------------------------------------------------------------ stats sidecar
def _bin_signature(prefix: str | os.PathLike) -> dict:
    st = os.stat(bin_path(prefix))
    return {"bin_size": int(st.st_size), "bin_mtime_ns": int(st.st_mtime_ns)}


def write_stats(prefix: str | os.PathLike, stats: dict, path: str | None = None) -> str:
    """Write ``stats`` (token counts and id range) for the ``.bin`` of ``prefix`` to ``path`` (default the
    sidecar ``{prefix}.stats.json``), atomically: a temporary name, then a rename. Returns the path.

    The size and mtime of the ``.bin`` are recorded so :func:`read_stats` can tell a stale file.
    """
    path = stats_path(prefix) if path is None else path
    record = {
        "version": STATS_VERSION,
        "bin": os.path.abspath(bin_path(prefix)),
        **_bin_signature(prefix),
        **stats,
    }
    with atomic_write(path, temp=path + temp_tag()) as f:  # the named scheme: a dead writer's file is removed
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def read_stats(prefix: str | os.PathLike, path: str | None = None) -> dict | None:
    """The stats at ``path`` (default the sidecar of ``prefix``) if they describe the ``.bin`` as it is now
    (same size and mtime), else None (no file, unreadable, or written for another version of the data)."""
    path = stats_path(prefix) if path is None else path
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        signature = _bin_signature(prefix)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != STATS_VERSION:
        return None
    if any(record.get(k) != v for k, v in signature.items()):
        return None
    if not all(k in record and isinstance(record[k], int | None) for k in ("min_token_id", "max_token_id")):
        return None
    return record


EOD_FIELD = "eod_token_id"
"""Sidecar field: the id appended after each document (null when none was)."""


class EodMismatchError(IndexedDatasetError):
    """Datasets meant to be read together record different document separators."""


def _describe_eod(eod: int | None) -> str:
    return "none (no separator appended)" if eod is None else str(eod)


def _sidecar_eod(prefix: str | os.PathLike) -> tuple[bool, int | None]:
    """(known, id) of ``prefix``'s recorded separator; unknown without a current sidecar or its field."""
    record = read_stats(prefix)
    if record is None or EOD_FIELD not in record:
        return False, None
    eod = record[EOD_FIELD]
    if eod is not None and (isinstance(eod, bool) or not isinstance(eod, int)):
        return False, None  # not written by these tools: as good as absent
    return True, eod


def recorded_eods(prefixes: Iterable[str | os.PathLike]) -> tuple[bool, int | None]:
    """(all_known, id): the separator the sidecars of ``prefixes`` agree on, and whether every one records it.

    Raises :class:`EodMismatchError` naming the first two prefixes (and their sidecars) that record different
    separators, one of them possibly "none". Prefixes without a current sidecar, or whose sidecar predates
    the field, are unknown and never conflict with anything.
    """
    first: tuple[str, int | None] | None = None
    all_known = True
    for prefix in prefixes:
        known, eod = _sidecar_eod(prefix)
        all_known = all_known and known
        if not known:
            continue
        if first is None:
            first = (os.fspath(prefix), eod)
        elif eod != first[1]:
            raise EodMismatchError(
                f"{prefix}: eod_token_id {_describe_eod(eod)} ({stats_path(prefix)}) but {first[0]} records "
                f"{_describe_eod(first[1])} ({stats_path(first[0])}); expected one document separator for "
                "all datasets read together: preprocess them again with the same --eod-token"
            )
    return all_known, None if first is None else first[1]


def recorded_eod(prefixes: Iterable[str | os.PathLike]) -> int | None:
    """The document-separator id the ``.stats.json`` sidecars of a blend's ``prefixes`` record, if any.

    Returns the id when at least one prefix records one and no two disagree; None when none records an id
    (no sidecar, a sidecar older than the field, one that does not describe the current ``.bin``, or data
    written without ``--append-eod``). Raises :class:`EodMismatchError` naming two prefixes and their ids
    when the sidecars disagree (including an id against "none appended").
    """
    return recorded_eods(prefixes)[1]


# ------------------------------------------------------------------------------------ temporary files
def _host_tag() -> str:
    """This host's name as it appears in temporary file names (no dots, so the suffixes stay parseable)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def temp_tag(pid: int | None = None, host: str | None = None) -> str:
    """The suffix a writer appends to ``{prefix}.bin`` / ``{prefix}.idx`` for its temporary files."""
    return f".tmp-{os.getpid() if pid is None else pid}@{_host_tag() if host is None else host}"


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (in doubt, it does: its files are then kept)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would not be a probe there
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def remove_stale_temp_files(prefix: str | os.PathLike) -> list[str]:
    """Remove the temporary files of ``prefix`` left by writers that died; return the removed paths.

    A file is removed only when its name says it was written on this host (or carries no host: the names of
    earlier versions) by a PID that is no longer alive. Temporary files of other prefixes, of live writers
    and of writers on other hosts are never touched. A PID reused since then by another process only delays
    the clean-up to a later run.
    """
    prefix = os.fspath(prefix)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    base = os.path.basename(prefix)
    pattern = re.compile(
        re.escape(base) + r"\.(?:bin|idx|stats\.json)\.tmp-(\d+)(?:@([A-Za-z0-9_-]+))?(?:\.lengths|\.docs)?"
    )
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    here = _host_tag()
    removed = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid, host = int(m.group(1)), m.group(2)
        if (host is not None and host != here) or _pid_alive(pid):
            continue
        path = os.path.join(out_dir, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue  # another new writer removed it first
        removed.append(path)
    return removed


class IndexedDataset:
    """Read-only view of ``{prefix}.idx/.bin``; opening costs a few page faults, not a read of the data.

    ``ds[i]`` is sequence ``i`` (a read-only NumPy view into the memory-mapped ``.bin``); ``ds.get(i, offset,
    length)`` a slice of it. ``sizes``, ``pointers`` and ``document_indices`` are memory-mapped too.
    """

    _OPEN_ATTEMPTS = 5
    """How many times a pair replaced while being opened is opened again before giving up."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for _ in range(self._OPEN_ATTEMPTS):
            if not os.path.isfile(ipath):
                raise FileNotFoundError(
                    f"{ipath}: index file not found (expected {{prefix}}.idx beside .bin)"
                )
            if not os.path.isfile(bpath):
                raise FileNotFoundError(f"{bpath}: data file not found (expected {{prefix}}.bin beside .idx)")
            try:
                with open(ipath, "rb") as fi, open(bpath, "rb") as fb:
                    if self._same_file(ipath, fi):
                        self._load(ipath, bpath, fi, fb)
                        return
            except FileNotFoundError:
                continue  # a writer removed the index between the check and the open: look again
        raise IndexedDatasetError(
            f"{ipath} and {bpath}: replaced {self._OPEN_ATTEMPTS} times while being opened; another process "
            "is writing this dataset, open it when that is done"
        )

    @staticmethod
    def _same_file(path: str, f) -> bool:
        """Whether ``path`` still names the open file ``f`` (a writer publishes by first removing the .idx)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        own = os.fstat(f.fileno())
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _load(self, ipath: str, bpath: str, fi, fb) -> None:
        """Validate and map the pair from the open files ``fi`` (.idx) and ``fb`` (.bin)."""
        idx_size = os.fstat(fi.fileno()).st_size
        header = fi.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(
                f"{ipath}: truncated index, {len(header)} bytes but the MMIDIDX header alone is {HEADER_SIZE}"
            )
        if header[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{ipath}: bad magic {header[: len(MAGIC)]!r}, expected {MAGIC!r} (not a Megatron MMIDIDX index)"
            )
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: unsupported index version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{ipath}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count, self.document_count = struct.unpack_from("<QQ", header, 18)
        expected = HEADER_SIZE + self.sequence_count * (4 + 8) + self.document_count * 8
        if idx_size < expected:
            raise IndexedDatasetError(
                f"{ipath}: truncated index, {idx_size} bytes but {self.sequence_count} sequences and "
                f"{self.document_count} document indices need {expected}"
            )
        if self.document_count < 1:
            raise IndexedDatasetError(f"{ipath}: document_count is 0, expected at least 1 (the leading 0)")
        self._idx_map = np.memmap(fi, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        n = self.sequence_count
        self.sizes = np.frombuffer(self._idx_map, dtype=np.int32, count=n, offset=off)
        off += n * 4
        self.pointers = np.frombuffer(self._idx_map, dtype=np.int64, count=n, offset=off)
        off += n * 8
        self.document_indices = np.frombuffer(
            self._idx_map, dtype=np.int64, count=self.document_count, offset=off
        )
        bin_size = os.fstat(fb.fileno()).st_size
        data_bytes = 0 if n == 0 else int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if bin_size != data_bytes:
            raise IndexedDatasetError(
                f"{bpath}: size {bin_size} bytes does not match the index {ipath}, which describes "
                f"{data_bytes} bytes of {self.dtype.name} tokens: the two files are not one pair (written "
                "separately, copied or cut short); write the dataset again"
            )
        if self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise IndexedDatasetError(
                f"{ipath}: document_indices must run from 0 to sequence_count={n}, got "
                f"{int(self.document_indices[0])} ... {int(self.document_indices[-1])}"
            )
        self._bin_map = np.memmap(fb, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def __getstate__(self) -> dict:
        # pickled (DataLoader workers, spawn) as its path: re-mapped on load instead of copying the data
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])  # type: ignore[misc]

    def __len__(self) -> int:
        return int(self.sequence_count)

    @property
    def num_documents(self) -> int:
        return int(self.document_count) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.prefix}: sequence {i} out of range for {len(self)} sequences")
        i = int(i) % len(self)
        return np.frombuffer(
            self._bin_map, dtype=self.dtype, count=int(self.sizes[i]), offset=int(self.pointers[i])
        )

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when length is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self.prefix}: slice [{offset}, {offset + length}) outside sequence {i} of {size}"
            )
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_map, dtype=self.dtype, count=length, offset=start)

    def token_slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens at global positions ``[start, stop)`` of the ``.bin`` (position ``p`` is byte
        ``p * itemsize``: token ``o`` of sequence ``s`` is position ``pointers[s] // itemsize + o``)."""
        end = len(self._bin_map) // self.dtype.itemsize
        if not 0 <= start <= stop <= end:
            raise IndexError(f"{self.prefix}: token positions [{start}, {stop}) outside [0, {end})")
        return np.frombuffer(
            self._bin_map, dtype=self.dtype, count=stop - start, offset=start * self.dtype.itemsize
        )

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document ``d`` (one per document when written without sentence splitting)."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self[i] for i in range(lo, hi)]


class IndexedDatasetBuilder:
    """Streams sequences into ``{prefix}.bin/.idx`` under temporary names; :meth:`finalize` publishes them.

    Use as a context manager: an exception (or KeyboardInterrupt) inside, or a failure of :meth:`finalize`
    itself (disk full), removes every temporary file. Creating a builder first removes the temporary files
    that dead writers of the same prefix left behind (:func:`remove_stale_temp_files`).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type | np.dtype = np.int32):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(
                f"{self.prefix}: dtype {self.dtype} has no MMIDIDX code; use one of {list(CODE_OF_DTYPE)}"
            )
        out_dir = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"output directory {out_dir} does not exist (from prefix {self.prefix})")
        remove_stale_temp_files(self.prefix)
        tag = temp_tag()
        self._tmp_bin = bin_path(self.prefix) + tag
        self._tmp_idx = idx_path(self.prefix) + tag
        self._tmp_lengths = idx_path(self.prefix) + tag + ".lengths"
        self._tmp_docs = idx_path(self.prefix) + tag + ".docs"
        # three append-only streams kept open for the builder's lifetime; closed by finalize() or abort()
        try:
            self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115
        except OSError as e:
            raise PermissionError(f"cannot write to output directory {out_dir}: {e.strerror}") from None
        self._lengths = self._docs = None
        try:
            self._lengths = open(self._tmp_lengths, "wb")  # noqa: SIM115
            self._docs = open(self._tmp_docs, "wb")  # noqa: SIM115
        except BaseException:
            self.abort()
            raise
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0
        self.min_token_id: int | None = None
        self.max_token_id: int | None = None
        self._finalized = False
        self._prepared = False
        self._last_doc_end = 0

    # ------------------------------------------------------------------ writing
    def _see(self, low: int | None, high: int | None) -> None:
        """Widen the recorded token id range to ``[low, high]``."""
        if high is None or low is None:
            return
        self.min_token_id = low if self.min_token_id is None else min(self.min_token_id, low)
        self.max_token_id = high if self.max_token_id is None else max(self.max_token_id, high)

    def _see_tokens(self, arr: np.ndarray) -> None:
        if arr.size:
            self._see(int(arr.min()), int(arr.max()))

    def token_stats(self) -> dict:
        """What the sidecar records about the tokens written so far (see :func:`write_stats`)."""
        return {
            "dtype": self.dtype.name,
            "num_tokens": self.token_count,
            "num_sequences": self.sequence_count,
            "num_documents": self.document_count,
            "min_token_id": self.min_token_id,
            "max_token_id": self.max_token_id,
        }

    def add_item(self, tokens: np.ndarray | Iterable[int]) -> None:
        """Append one sequence (no document boundary)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._see_tokens(arr)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.write(np.int32(arr.size).tobytes())
        self.sequence_count += 1
        self.token_count += int(arr.size)

    def add_items(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several sequences given back to back in ``tokens`` with their ``lengths`` (one write)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.ascontiguousarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(
                f"{self.prefix}: lengths sum to {int(lengths.sum())} but {tokens.size} tokens given"
            )
        self._see_tokens(tokens)
        self._bin.write(tokens.tobytes())
        self._lengths.write(lengths.tobytes())
        self.sequence_count += int(lengths.size)
        self.token_count += int(tokens.size)

    def end_document(self) -> None:
        """Close the current document: its sequences are those added since the previous boundary."""
        self._docs.write(np.int64(self.sequence_count).tobytes())
        self.document_count += 1
        self._last_doc_end = self.sequence_count

    def add_document(self, tokens: np.ndarray | Iterable[int], lengths: Iterable[int] | None = None) -> None:
        """Append one document made of one sequence, or of ``lengths`` sequences (sentence splitting)."""
        if lengths is None:
            self.add_item(tokens)
        else:
            self.add_items(np.asarray(tokens), np.asarray(list(lengths)))
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once (the fast path used by preprocess_data.py)."""
        self.add_items(tokens, lengths)
        start = self.sequence_count - int(np.asarray(lengths).size)
        ends = np.arange(start + 1, self.sequence_count + 1, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.document_count += int(ends.size)
        self._last_doc_end = self.sequence_count

    def add_index(self, prefix: str | os.PathLike, vocab_size: int | None = None) -> None:
        """Append a whole existing dataset, streaming its ``.bin`` and keeping its document boundaries.

        With ``vocab_size``, every token id must lie in ``[0, vocab_size)`` (checked while copying).
        """
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{idx_path(prefix)}: dtype {other.dtype.name} differs from the output's {self.dtype.name}; "
                "datasets made with different vocabularies cannot be merged"
            )
        base = self.sequence_count
        self._bin.flush()
        known = read_stats(prefix)
        if vocab_size is None and known is not None:  # the id range is known: a plain copy
            with open(bin_path(prefix), "rb") as src:
                shutil.copyfileobj(src, self._bin, _COPY_BYTES)
            self._see(known["min_token_id"], known["max_token_id"])
        else:
            self._copy_tokens(other, vocab_size)
        for lo in range(0, len(other), _CHUNK):
            self._lengths.write(np.ascontiguousarray(other.sizes[lo : lo + _CHUNK]).tobytes())
        docs = other.document_indices
        for lo in range(1, len(docs), _CHUNK):
            self._docs.write((docs[lo : lo + _CHUNK].astype(np.int64) + base).tobytes())
        self.sequence_count += len(other)
        self.document_count += other.num_documents
        self.token_count += other.num_tokens
        self._last_doc_end = self.sequence_count

    def _copy_tokens(self, other: IndexedDataset, vocab_size: int | None) -> None:
        """Copy the tokens of ``other`` in chunks, recording their range (and checking it against a vocab)."""
        tokens = np.frombuffer(other._bin_map, dtype=other.dtype)
        step = _COPY_BYTES // other.dtype.itemsize
        for lo in range(0, tokens.size, step):
            chunk = tokens[lo : lo + step]
            low, high = int(chunk.min()), int(chunk.max())
            self._see(low, high)
            if vocab_size is not None and (low < 0 or high >= vocab_size):
                bad = high if high >= vocab_size else low
                raise IndexedDatasetError(
                    f"{other.prefix}.bin: token id {bad} is outside the vocabulary of {vocab_size} tokens "
                    "(expected ids in [0, vocab_size)): this dataset was tokenized with another vocabulary"
                )
            self._bin.write(chunk.tobytes())

    # ---------------------------------------------------------------- finishing
    def finalize(self) -> None:
        """Write the index from the side files in chunks and publish the pair (see the module docstring).

        On any failure (disk full while writing the index, ...) every temporary file is removed, and the
        error is raised again; an existing dataset at the prefix is then left as it was.
        """
        self.prepare()
        if self._finalized:
            return
        try:
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._finalized = True

    def prepare(self) -> None:
        """Write the index and make both files durable under their temporary names; publish nothing yet.

        Several builders that must succeed together (one per JSON key) are all prepared before any is
        finalized, so a failure while writing one index leaves every existing dataset as it was.
        """
        if self._prepared or self._finalized:
            return
        try:
            self._write_index()
        except BaseException:
            self.abort()
            raise
        self._prepared = True

    def _write_index(self) -> None:
        if self.sequence_count > self._last_doc_end:
            self.end_document()  # sequences after the last boundary form the final document
        self._bin.flush()
        os.fsync(self._bin.fileno())
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        with open(self._tmp_idx, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            out.write(struct.pack("<Q", self.sequence_count))
            out.write(struct.pack("<Q", self.document_count + 1))
            with open(self._tmp_lengths, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
            if self.sequence_count:
                lengths = np.memmap(self._tmp_lengths, dtype=np.int32, mode="r")
                carry = 0
                itemsize = self.dtype.itemsize
                for lo in range(0, lengths.size, _CHUNK):
                    nbytes = lengths[lo : lo + _CHUNK].astype(np.int64) * itemsize
                    ends = np.cumsum(nbytes) + carry
                    pointers = ends - nbytes
                    carry = int(ends[-1])
                    out.write(pointers.tobytes())
                del lengths
            out.write(np.int64(0).tobytes())
            with open(self._tmp_docs, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.remove(self._tmp_lengths)
        os.remove(self._tmp_docs)

    def _publish(self) -> None:
        """Old ``.idx`` away, then ``.bin``, then ``.idx``: no reader ever pairs an index with another .bin."""
        final_idx = idx_path(self.prefix)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stats_path(self.prefix))  # it described the old .bin
        with contextlib.suppress(FileNotFoundError):
            os.remove(final_idx)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, final_idx)
        fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))

    def abort(self) -> None:
        """Close and delete every temporary file (nothing that looks like an output remains).

        Closing may fail (a full disk refuses the buffered bytes): the files are deleted all the same.
        """
        for f in (self._bin, self._lengths, self._docs):
            if f is not None:
                with contextlib.suppress(OSError):  # the descriptor is released even when the flush fails
                    f.close()
        for p in (self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        self._finalized = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._finalized:
            self.finalize()


def merge_datasets(
    prefixes: list[str | os.PathLike],
    output_prefix: str | os.PathLike,
    vocab_size: int | None = None,
    stats: dict | None = None,
) -> IndexedDataset:
    """Concatenate datasets into ``output_prefix`` without loading them; returns the result.

    With ``stats`` (extra fields, may be empty), the sidecar ``{output_prefix}.stats.json`` is written too
    (best effort: a failure to write it is logged, the merged dataset stays). Inputs whose sidecars record
    different document separators are refused (:func:`recorded_eods`); the output records the separator when
    every input does (or ``stats`` gives it), else it is unknown.

    What can be checked: MMIDIDX files record no tokenizer or vocabulary, only the token dtype (uint16 for a
    vocabulary under 65500, int32 above), so datasets of different dtypes are refused; with ``vocab_size``
    every token id must also be below it. Two vocabularies of similar size cannot be told apart from the
    files alone (and the largest id of each input says nothing about it: a small input may simply not use
    the rare ids), so the caller must know that the inputs share a tokenizer. On any refusal nothing is
    written.
    """
    if not prefixes:
        raise ValueError("merge_datasets: no input prefixes given")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"merge_datasets: vocab_size must be >= 1, got {vocab_size}")
    all_known, eod = recorded_eods(prefixes)  # refused before anything is written
    first = IndexedDataset(prefixes[0])
    for p in prefixes[1:]:
        other = IndexedDataset(p)
        if other.dtype != first.dtype:
            raise IndexedDatasetError(
                f"{idx_path(p)}: dtype {other.dtype.name} differs from {first.dtype.name} of {idx_path(prefixes[0])}; "
                "datasets made with different vocabularies cannot be merged"
            )
    with IndexedDatasetBuilder(output_prefix, first.dtype) as builder:
        for p in prefixes:
            builder.add_index(p, vocab_size)
    if stats is not None:
        if all_known and EOD_FIELD not in stats:
            stats = {**stats, EOD_FIELD: eod}
        try:
            write_stats(output_prefix, {**builder.token_stats(), **stats})
        except OSError as e:
            log.warning("warning: could not write %s (%s)", stats_path(output_prefix), e)
    return IndexedDataset(output_prefix)


def remove_dataset(prefix: str | os.PathLike) -> None:
    for p in (bin_path(prefix), idx_path(prefix), stats_path(prefix)):
        Path(p).unlink(missing_ok=True)
