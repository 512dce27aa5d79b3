"""Streaming access to raw corpora: ``.jsonl``, ``.jsonl.gz``, ``.txt`` (optionally ``.gz``), by glob.

Lines are read one at a time as bytes so that a bad line can be reported as ``file:line`` with its reason and
memory never depends on the file size.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from typing import IO

from megatron_ki.errors import MegatronKIError


class CorpusError(MegatronKIError, ValueError):
    """Bad input: the message starts with ``file:line`` where there is one."""


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Files matched by each pattern (glob or path), sorted per pattern, de-duplicated, order kept."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pat in patterns:
        if not glob.has_magic(pat):
            if os.path.isdir(pat):
                raise CorpusError(
                    f"--input {pat}: is a directory, expected a file or a glob like '{pat}/*.jsonl'"
                )
            if not os.path.exists(pat):
                raise CorpusError(f"--input {pat}: file not found")
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise CorpusError(f"--input {pat}: no file matches")
        for m in matches:
            if m not in files:
                files.append(m)
    return files


def open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_lines(path: str) -> Iterator[bytes]:
    """The raw lines of ``path`` (gunzipped for ``.gz``); a damaged gzip file raises one CorpusError naming it."""
    lineno = 0
    with open_binary(path) as f:
        try:
            for raw in f:
                yield raw
                lineno += 1
        except EOFError:
            raise CorpusError(
                f"{path}: truncated gzip file, it ends after line {lineno} without the gzip end-of-stream "
                "marker (expected a complete .gz: was it cut short while being written or copied?)"
            ) from None
        except (gzip.BadGzipFile, zlib.error) as e:
            if lineno == 0 and str(e).startswith("Not a gzipped file"):
                with open(path, "rb") as raw_file:
                    head = raw_file.read(8)
                raise CorpusError(
                    f"{path}: not a gzip file (it starts with {head!r}, expected the gzip magic b'\\x1f\\x8b'); "
                    "drop the .gz suffix if it is plain text"
                ) from None
            raise CorpusError(
                f"{path}: corrupt gzip data after line {lineno} ({e}); expected a valid .gz file"
            ) from None


def is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def parse_json_line(raw: bytes, keys: list[str]) -> tuple[list[str] | None, str | None]:
    """Texts for ``keys`` from one JSON line, or ``(None, reason)`` when the line is bad."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start})"
    if not line.strip():
        return None, "empty line, expected a JSON object"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        # some messages end with "at" ("Unterminated string starting at"): the column completes them
        return None, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    texts = []
    for k in keys:
        if k not in obj:
            return None, f"missing key {k!r} (keys present: {sorted(obj)[:8]})"
        v = obj[k]
        if not isinstance(v, str):
            return None, f"key {k!r} holds {type(v).__name__}, expected a string"
        texts.append(v)
    return texts, None


def iter_texts(
    files: list[str], json_key: str = "text", skip_bad_lines: bool = False, split_lines: bool = False
) -> Iterator[str]:
    """Stream texts: the ``json_key`` of each ``.jsonl`` line, or each non-empty line of a ``.txt`` file.

    With ``split_lines`` a JSON text is further split into its lines (sentencepiece trains on lines).
    """
    for path in files:
        jsonl = is_jsonl(path)
        for lineno, raw in enumerate(iter_lines(path), 1):
            if jsonl:
                texts, reason = parse_json_line(raw, [json_key])
                if texts is None:
                    if skip_bad_lines:
                        continue
                    raise CorpusError(f"{path}:{lineno}: {reason}")
                text = texts[0]
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    if skip_bad_lines:
                        continue
                    raise CorpusError(f"{path}:{lineno}: not valid UTF-8") from None
            if split_lines:
                for part in text.splitlines():
                    if part.strip():
                        yield part
            elif text.strip():
                yield text.rstrip("\n")
