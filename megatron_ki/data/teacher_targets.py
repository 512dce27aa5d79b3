"""Offline teacher targets: a teacher's top-K next-token distribution for every token of an MMIDIDX dataset.

Written once by ``tools/precompute_teacher.py`` and read by any student, whatever its sequence length, batch
size, seed, shuffle or data-parallel size, because the rows follow the dataset's tokens, not a sample order.

Alignment: row ``r`` is the teacher's distribution over the token *after* global token ``r`` of the dataset's
``.bin`` (token ``o`` of sequence ``s`` is global index ``pointers[s] // itemsize + o``), computed with the
context of that token's own sequence only (a sequence is what ``preprocess_data.py`` writes per document).
The last token of a sequence has a row too (the teacher's guess of what follows it).

Masked-LM teachers (header ``masking``, ``data/static_mask.py``): row ``r`` is the teacher's distribution over
the token *at* position ``positions[r]``, given its sequence with the static mask applied; only the positions the
mask selects have rows, listed in ``PATH.pos`` (int64 little-endian, ascending), so the pair costs the bytes of
the predicted tokens (``mask_prob`` of the tokens), not of every token.

Files (``PATH`` given to the writer):

- ``PATH.idx``: a UTF-8 JSON header (sorted keys, so identical runs give identical bytes): ``format``,
  ``version``, ``num_rows``, ``k``, ``temperature``, ``values`` (``fp16`` | ``int8``) and ``value_encoding``,
  ``id_bytes``, ``row_bytes``, ``vocab_size`` (ids are below it), ``teacher`` (path, family, vocab size, config
  and its sha256), ``tokenizer`` (type, model, vocab size), ``dataset`` (prefix, sha256 of its ``.idx``,
  sequences, tokens), ``window`` (the policy for sequences longer than the teacher's context) and
  ``chunking`` (how the precompute split the work), ``masking`` (null, or the static mask of an MLM teacher).
- ``PATH.bin``: ``num_rows`` rows of ``row_bytes`` bytes, little-endian, each
  ``[K ids][K values][tail]``: ids in ``id_bytes`` bytes (2 up to a 65,536 vocabulary, 3 packed up to
  16,777,216, else 4); values the K largest log-probabilities at ``temperature``, sorted descending, ties
  lower id first; tail ``log(1 - sum_k p_k)`` as float16 (``-inf`` when the K ids hold all the mass, so a
  ``0 * log 0`` term is exactly 0).

Value encodings: ``fp16``: IEEE half, round to nearest: error at most ``|logp| * 2**-11`` (relative 4.9e-4).
``int8``: one byte ``c = round(-logp / INT8_STEP)`` clipped to 0..255, read as ``-c * INT8_STEP`` with
``INT8_STEP = 16 / 255``: absolute error at most ``INT8_STEP / 2`` (0.0314) for ``logp >= -16``; smaller
log-probabilities (probabilities below 1.2e-7) read as -16.

Publication: the writer fills ``PATH.bin.tmp`` (and ``PATH.pos.tmp``; preallocated, rows written in place by any
rank) and records each finished chunk in ``PATH.progress/``; only when every chunk is there are ``.pos``,
``.bin`` then ``.idx`` renamed into place. A reader refuses a path without ``.idx``. NumPy, JSON and the standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np

from megatron_ki.errors import MegatronKIError
from megatron_ki.fileio import fsync_dir, write_text_atomic

FORMAT = "megatron_ki.teacher_targets"
VERSION = 1
VALUE_ENCODINGS = ("fp16", "int8")
INT8_LOGP_RANGE = 16.0
INT8_STEP = INT8_LOGP_RANGE / 255
INT8_MAX_ERROR = INT8_STEP / 2
"""Largest absolute error of an int8 log-probability in ``[-INT8_LOGP_RANGE, 0]``."""
FP16_RELATIVE_ERROR = 2.0**-11
"""Largest relative error of an fp16 log-probability (round to nearest, normal range)."""
TAIL_BYTES = 2


class TeacherTargetsError(MegatronKIError, ValueError):
    """A targets file is missing, unpublished, corrupt, or paired with another dataset, teacher or tokenizer."""


# ------------------------------------------------------------------------------------------ layout
def id_bytes_for(vocab_size: int) -> int:
    """The smallest id width that holds ``vocab_size`` ids: 2, 3 (packed) or 4 bytes."""
    if vocab_size <= 1 << 16:
        return 2
    if vocab_size <= 1 << 24:
        return 3
    if vocab_size <= 1 << 32:
        return 4
    raise TeacherTargetsError(f"vocabulary of {vocab_size} ids does not fit 4-byte ids")


def row_bytes(k: int, id_bytes: int, values: str) -> int:
    """Bytes of one row: K ids, K values, the tail."""
    return k * (id_bytes + value_bytes(values)) + TAIL_BYTES


def value_bytes(values: str) -> int:
    if values not in VALUE_ENCODINGS:
        raise TeacherTargetsError(f"value encoding {values!r}: expected one of {', '.join(VALUE_ENCODINGS)}")
    return 2 if values == "fp16" else 1


def value_encoding_doc(values: str) -> str:
    """The header's words for how values are stored (a reader needs only ``values``)."""
    if values == "fp16":
        return "log-probability as IEEE float16, round to nearest; error <= |logp| * 2^-11"
    return (
        f"uint8 c = round(-logp / {INT8_STEP!r}) clipped to [0, 255], read as -c * {INT8_STEP!r}; "
        f"error <= {INT8_MAX_ERROR!r} for logp >= -{INT8_LOGP_RANGE}, smaller logp read as -{INT8_LOGP_RANGE}"
    )


def encode_rows(
    ids: np.ndarray, logp: np.ndarray, tail: np.ndarray, id_bytes: int, values: str
) -> np.ndarray:
    """``ids [n, K]``, ``logp [n, K]``, ``tail [n]`` -> ``uint8 [n, row_bytes]``."""
    n, k = ids.shape
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << (8 * id_bytes)):
        raise TeacherTargetsError(
            f"token ids outside [0, 2^{8 * id_bytes}) cannot be stored in {id_bytes} bytes"
        )
    id_part = ids.astype("<u4").view(np.uint8).reshape(n, k, 4)[:, :, :id_bytes].reshape(n, k * id_bytes)
    logp = np.asarray(logp, dtype=np.float32)
    if values == "fp16":
        val_part = logp.astype("<f2").view(np.uint8).reshape(n, 2 * k)
    else:
        code = np.clip(np.rint(-logp.astype(np.float64) / INT8_STEP), 0, 255)
        val_part = np.nan_to_num(code, nan=255.0).astype(np.uint8).reshape(n, k)
    tail_part = np.asarray(tail, dtype=np.float32).astype("<f2").view(np.uint8).reshape(n, TAIL_BYTES)
    return np.ascontiguousarray(np.concatenate([id_part, val_part, tail_part], axis=1))


def decode_rows(
    raw: np.ndarray, k: int, id_bytes: int, values: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``uint8 [n, row_bytes]`` -> ``(ids int64 [n, K], logp float32 [n, K], tail float32 [n])``."""
    n = raw.shape[0]
    id_end = k * id_bytes
    id_raw = raw[:, :id_end].reshape(n, k, id_bytes)
    padded = np.zeros((n, k, 4), dtype=np.uint8)
    padded[:, :, :id_bytes] = id_raw
    ids = padded.view("<u4").reshape(n, k).astype(np.int64)
    val_end = id_end + k * value_bytes(values)
    if values == "fp16":
        logp = np.ascontiguousarray(raw[:, id_end:val_end]).view("<f2").astype(np.float32)
    else:
        logp = raw[:, id_end:val_end].astype(np.float32) * np.float32(-INT8_STEP)
    tail = np.ascontiguousarray(raw[:, val_end : val_end + TAIL_BYTES]).view("<f2").astype(np.float32)
    return ids, logp.reshape(n, k), tail.reshape(n)


# ------------------------------------------------------------------------------------------- paths
def idx_file(path: str) -> str:
    return f"{path}.idx"


def bin_file(path: str) -> str:
    return f"{path}.bin"


def tmp_bin_file(path: str) -> str:
    return f"{path}.bin.tmp"


def pos_file(path: str) -> str:
    return f"{path}.pos"


def tmp_pos_file(path: str) -> str:
    return f"{path}.pos.tmp"


POS_DTYPE = np.dtype("<i8")


def progress_dir(path: str) -> str:
    return f"{path}.progress"


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 16 MiB blocks (a dataset's ``.idx`` may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def bin_sample_sha256(path: str, blocks: int = 16, block: int = 1 << 16) -> str:
    """sha256 of a file's size and ``blocks`` evenly spaced ``block``-byte pieces (first and last included):
    tokens differing under equal lengths (same ``.idx``) are caught without reading a large ``.bin`` whole."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(size - block, 0) * i // max(blocks - 1, 1))
            h.update(f.read(block))
    return h.hexdigest()


def dataset_identity(prefix: str) -> dict[str, Any]:
    """What the header records of a dataset: its prefix, the sha256 of its ``.idx`` (documents and lengths),
    a sampled sha256 of its ``.bin`` (:func:`bin_sample_sha256`), sequences and tokens."""
    from .indexed import IndexedDataset, bin_path, idx_path

    ds = IndexedDataset(prefix)
    return {
        "prefix": os.path.abspath(prefix),
        "idx_sha256": file_sha256(idx_path(prefix)),
        "bin_sample_sha256": bin_sample_sha256(bin_path(prefix)),
        "num_sequences": len(ds),
        "num_tokens": ds.num_tokens,
    }


def token_base(dataset: Any) -> np.ndarray:
    """Global token index of each sequence's first token (``pointers // itemsize``) of an
    :class:`~megatron_ki.data.indexed.IndexedDataset`: token ``o`` of sequence ``s`` is row
    ``token_base(ds)[s] + o`` of its targets."""
    return np.asarray(dataset.pointers, dtype=np.int64) // dataset.dtype.itemsize


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a model config dict in canonical JSON: the teacher's identity beyond its path."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def header_text(header: dict[str, Any]) -> str:
    return json.dumps(header, indent=1, sort_keys=True) + "\n"


def read_header(path: str) -> dict[str, Any]:
    """The published header of ``path``; a missing or unpublished one is a :class:`TeacherTargetsError`."""
    ipath = idx_file(path)
    if not os.path.isfile(ipath):
        why = "no such file"
        if os.path.exists(tmp_bin_file(path)) or os.path.isdir(progress_dir(path)):
            why = (
                f"not published: a precompute is unfinished ({tmp_bin_file(path)} / {progress_dir(path)} exist); "
                "rerun tools/precompute_teacher.py with the same options to finish it"
            )
        raise TeacherTargetsError(f"teacher targets {path}: {ipath}: {why}")
    try:
        with open(ipath, encoding="utf-8") as f:
            header = json.load(f)
    except ValueError as e:
        raise TeacherTargetsError(f"teacher targets {ipath}: not a JSON header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TeacherTargetsError(f"teacher targets {ipath}: not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise TeacherTargetsError(
            f"teacher targets {ipath}: format version {header.get('version')}, this reader knows {VERSION}"
        )
    return header


# ------------------------------------------------------------------------------------------ reader
class TeacherTargets:
    """A published targets pair, memory-mapped. ``rows(positions)`` decodes the rows of global token indices.

    ``dataset_prefix`` given: the header must name a dataset whose ``.idx`` hashes the same and has as many
    tokens as there are rows; otherwise the pairing is refused, naming both sides.
    """

    def __init__(self, path: str, dataset_prefix: str | None = None):
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        h = self.header
        try:
            self.k, self.temperature = int(h["k"]), float(h["temperature"])
            self.vocab_size, self.num_rows = int(h["vocab_size"]), int(h["num_rows"])
            self.id_bytes, self.values, self.row_bytes = (
                int(h["id_bytes"]),
                str(h["values"]),
                int(h["row_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TeacherTargetsError(
                f"teacher targets {idx_file(self.path)}: header field {e} missing or bad"
            ) from None
        if self.row_bytes != row_bytes(self.k, self.id_bytes, self.values):
            raise TeacherTargetsError(
                f"teacher targets {idx_file(self.path)}: row_bytes {self.row_bytes} does not match k={self.k}, "
                f"id_bytes={self.id_bytes}, values={self.values}"
            )
        self._map_bin()
        if dataset_prefix is not None:
            self.check_dataset(dataset_prefix)

    def _map_bin(self) -> None:
        bpath = bin_file(self.path)
        if not os.path.isfile(bpath):
            raise TeacherTargetsError(
                f"teacher targets {self.path}: {bpath} not found beside {idx_file(self.path)}"
            )
        size, expected = os.path.getsize(bpath), self.num_rows * self.row_bytes
        if size != expected:
            raise TeacherTargetsError(
                f"teacher targets {bpath}: {size} bytes, but the header describes {self.num_rows} rows of "
                f"{self.row_bytes} bytes = {expected}: the pair is not one precompute's output"
            )
        data = np.memmap(bpath, mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)
        self._rows = data.reshape(self.num_rows, self.row_bytes)
        self.masking = self.header.get("masking")
        self._positions = self._map_positions() if self.masking else None

    def _map_positions(self) -> np.ndarray:
        """The ascending token positions that have rows (a masked-LM teacher's targets)."""
        ppath = pos_file(self.path)
        if not os.path.isfile(ppath):
            raise TeacherTargetsError(
                f"teacher targets {self.path}: {ppath} not found beside {idx_file(self.path)} (a masked-LM "
                "teacher's targets list the positions that have rows there)"
            )
        size, expected = os.path.getsize(ppath), self.num_rows * POS_DTYPE.itemsize
        if size != expected:
            raise TeacherTargetsError(
                f"teacher targets {ppath}: {size} bytes, but {self.num_rows} rows need {expected}: the files are "
                "not one precompute's output"
            )
        return np.memmap(ppath, mode="r", dtype=POS_DTYPE) if size else np.zeros(0, POS_DTYPE)

    def __len__(self) -> int:
        return self.num_rows

    def check_dataset(self, prefix: str) -> None:
        """Refuse a dataset other than the one the targets were computed for (its ``.idx`` hash, its token
        count, and a sampled hash of its ``.bin``)."""
        from .indexed import IndexedDataset, bin_path, idx_path

        recorded = self.header.get("dataset", {})
        given_hash = file_sha256(idx_path(prefix))
        given_tokens = IndexedDataset(prefix).num_tokens
        sample = recorded.get("bin_sample_sha256")
        other_tokens = sample is not None and sample != bin_sample_sha256(bin_path(prefix))
        tokens = recorded.get("num_tokens", self.num_rows)
        if recorded.get("idx_sha256") != given_hash or tokens != given_tokens or other_tokens:
            raise TeacherTargetsError(
                f"teacher targets {self.path} were computed for dataset {recorded.get('prefix')} (.idx sha256 "
                f"{str(recorded.get('idx_sha256'))[:16]}..., {tokens} tokens), but the dataset given is "
                f"{os.path.abspath(prefix)} (.idx sha256 {given_hash[:16]}..., {given_tokens} tokens): "
                "precompute targets for this dataset or give the dataset they were made from"
            )

    def check_compatible(
        self,
        tokenizer_vocab_size: int,
        teacher_vocab: int | None = None,
        tokenizer_type: str | None = None,
        tokenizer_model: str | None = None,
    ) -> None:
        """Refuse a student whose tokenizer (vocabulary size, type, model file name) or expected teacher
        vocabulary differs from the one the targets record, naming both sides."""
        tok, teacher = self.header.get("tokenizer", {}), self.header.get("teacher", {})
        checks = [
            ("tokenizer vocabulary", tok.get("vocab_size"), tokenizer_vocab_size),
            ("teacher vocabulary", teacher.get("vocab_size"), teacher_vocab),
            ("tokenizer type", tok.get("type"), tokenizer_type),
        ]
        if tokenizer_model is not None and tok.get("model") is not None:
            checks.append(
                ("tokenizer model", os.path.basename(str(tok["model"])), os.path.basename(tokenizer_model))
            )
        for what, recorded, given in checks:
            if given is not None and recorded is not None and recorded != given:
                raise TeacherTargetsError(
                    f"teacher targets {self.path} record {what} {recorded!r}, but the run uses {given!r}: "
                    "targets and student must share the tokenizer (and the teacher they were made with)"
                )
        if self.vocab_size > tokenizer_vocab_size:
            raise TeacherTargetsError(
                f"teacher targets {self.path} hold ids up to {self.vocab_size - 1}, but the run's tokenizer has "
                f"{tokenizer_vocab_size} tokens"
            )

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of int64 global token indices of any shape ``[...]``: ``(ids int64 [..., K], logp float32
        [..., K], tail_logp float32 [...])``."""
        pos = np.asarray(positions, dtype=np.int64)
        flat = pos.reshape(-1)
        if self._positions is not None:
            flat = self.row_index(flat)
        elif flat.size and (flat.min() < 0 or flat.max() >= self.num_rows):
            bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
            raise IndexError(f"teacher targets {self.path}: token index {bad} outside [0, {self.num_rows})")
        ids, logp, tail = decode_rows(self._rows[flat], self.k, self.id_bytes, self.values)
        shape = pos.shape
        return ids.reshape(*shape, self.k), logp.reshape(*shape, self.k), tail.reshape(shape)

    def row_index(self, positions: np.ndarray) -> np.ndarray:
        """Rows of token positions a masked-LM teacher's targets hold; a position without a row (the student
        masks other tokens than the precompute did) is refused."""
        at = np.searchsorted(self._positions, positions)
        found = at < self.num_rows
        found[found] = self._positions[at[found]] == positions[found]
        if not found.all():
            bad = int(positions[~found][0])
            raise TeacherTargetsError(
                f"teacher targets {self.path}: token position {bad} is predicted by the student but has no row: "
                f"the student's static mask differs from the one recorded ({self.masking})"
            )
        return at


# ------------------------------------------------------------------------------------------ writer
class TargetsWriter:
    """Writes rows of one precompute in place and publishes the pair when every chunk is done.

    One process calls :meth:`prepare` (creates or resumes the temporary files); then any process opens the
    writer and calls :meth:`write_rows` and :meth:`mark_done` for its chunks; one process calls
    :meth:`publish`. A chunk is recorded as done (``PATH.progress/chunk-N.done``) only after its rows are
    flushed, so a killed run resumes by recomputing exactly the chunks without a record.
    """

    def __init__(self, path: str, header: dict[str, Any]):
        self.path, self.header = os.fspath(path), header
        self.k, self.id_bytes, self.values = int(header["k"]), int(header["id_bytes"]), header["values"]
        self.row_bytes, self.num_rows = int(header["row_bytes"]), int(header["num_rows"])
        self.masked = bool(header.get("masking"))
        self._fd: int | None = None
        self._pos_fd: int | None = None

    # -- set-up (one process)
    @classmethod
    def prepare(cls, path: str, header: dict[str, Any], overwrite: bool = False) -> str:
        """Create or resume the temporary files for ``header``. Returns ``"published"`` (an identical
        published pair exists: nothing to do), ``"resume"`` or ``"fresh"``."""
        path = os.fspath(path)
        text = header_text(header)
        if os.path.isfile(idx_file(path)):
            with open(idx_file(path), encoding="utf-8") as f:
                if f.read() == text and os.path.isfile(bin_file(path)):
                    return "published"
            if not overwrite:
                raise TeacherTargetsError(
                    f"teacher targets {idx_file(path)} already exist with other settings or teacher; pass "
                    "--overwrite to replace them or choose another --output"
                )
            os.remove(idx_file(path))  # readers refuse the path from here on
        progress = progress_dir(path)
        pending = os.path.join(progress, "header.json")
        if os.path.isfile(pending):
            with open(pending, encoding="utf-8") as f:
                same = f.read() == text
            if same and (os.path.isfile(tmp_bin_file(path)) or cls._bin_complete(path, header)):
                return "resume"
            if not same and not overwrite:
                raise TeacherTargetsError(
                    f"teacher targets {path}: an unfinished precompute in {progress} was started with other "
                    "settings (teacher, data, K, temperature, values, window or chunking); rerun with the same "
                    "options, or pass --overwrite to start again"
                )
        cls._start_fresh(path, text, header)
        return "fresh"

    @staticmethod
    def _bin_complete(path: str, header: dict[str, Any]) -> bool:
        """A run killed between renaming the .bin and writing the .idx: the .bin is whole."""
        size = int(header["num_rows"]) * int(header["row_bytes"])
        return os.path.isfile(bin_file(path)) and os.path.getsize(bin_file(path)) == size

    @staticmethod
    def _start_fresh(path: str, text: str, header: dict[str, Any]) -> None:
        shutil.rmtree(progress_dir(path), ignore_errors=True)
        for stale in (bin_file(path), tmp_bin_file(path), pos_file(path), tmp_pos_file(path)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rows = int(header["num_rows"])
        _preallocate(tmp_bin_file(path), rows * int(header["row_bytes"]))
        if header.get("masking"):
            _preallocate(tmp_pos_file(path), rows * POS_DTYPE.itemsize)
        os.makedirs(progress_dir(path))
        write_text_atomic(os.path.join(progress_dir(path), "header.json"), text)
        fsync_dir(os.path.dirname(os.path.abspath(path)))

    # -- rows (any process)
    def done_chunks(self) -> set[int]:
        """Chunks recorded as done."""
        names = os.listdir(progress_dir(self.path)) if os.path.isdir(progress_dir(self.path)) else []
        return {
            int(n[len("chunk-") : -len(".done")])
            for n in names
            if n.startswith("chunk-") and n.endswith(".done")
        }

    def write_rows(
        self,
        first_row: int,
        ids: np.ndarray,
        logp: np.ndarray,
        tail: np.ndarray,
        positions: np.ndarray | None = None,
    ) -> None:
        """Rows ``first_row ..`` of the temporary ``.bin`` (and, masked-LM, their token ``positions`` in
        ``.pos``), written in place."""
        n = ids.shape[0]
        if first_row < 0 or first_row + n > self.num_rows:
            raise TeacherTargetsError(f"rows [{first_row}, {first_row + n}) outside [0, {self.num_rows})")
        if self.masked != (positions is not None):
            raise TeacherTargetsError(
                "token positions are written with a masked-LM teacher's rows, and only then"
            )
        if self._fd is None:
            self._fd = os.open(tmp_bin_file(self.path), os.O_RDWR)
        data = encode_rows(ids, logp, tail, self.id_bytes, self.values).tobytes()
        _pwrite_all(self._fd, data, first_row * self.row_bytes)
        if positions is not None:
            if self._pos_fd is None:
                self._pos_fd = os.open(tmp_pos_file(self.path), os.O_RDWR)
            data = np.ascontiguousarray(positions, dtype=POS_DTYPE).tobytes()
            _pwrite_all(self._pos_fd, data, first_row * POS_DTYPE.itemsize)

    def mark_done(self, chunk: int, rows: tuple[int, int]) -> None:
        """Flush the rows written so far, then record ``chunk`` (its rows ``[lo, hi)``) as done."""
        for fd in (self._fd, self._pos_fd):
            if fd is not None:
                os.fdatasync(fd)
        record = json.dumps({"chunk": chunk, "rows": list(rows)}) + "\n"
        write_text_atomic(os.path.join(progress_dir(self.path), f"chunk-{chunk:08d}.done"), record)

    def close(self) -> None:
        for fd in (self._fd, self._pos_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._pos_fd = None

    # -- publication (one process)
    def publish(self, num_chunks: int) -> None:
        """Rename ``.bin.tmp`` to ``.bin``, then write ``.idx``, once every chunk is recorded as done."""
        self.close()
        missing = sorted(set(range(num_chunks)) - self.done_chunks())
        if missing:
            raise TeacherTargetsError(
                f"teacher targets {self.path}: {len(missing)} of {num_chunks} chunks not written (first: "
                f"{missing[0]}); rerun to finish"
            )
        for tmp, final in ((tmp_pos_file, pos_file), (tmp_bin_file, bin_file)):  # the .bin last: see prepare
            if os.path.isfile(tmp(self.path)):
                fd = os.open(tmp(self.path), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp(self.path), final(self.path))
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        write_text_atomic(idx_file(self.path), header_text(self.header))
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        shutil.rmtree(progress_dir(self.path), ignore_errors=True)


def _preallocate(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)  # a full disk fails now, not hours in
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
