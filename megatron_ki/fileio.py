"""Files that appear whole or not at all: written under a temporary name beside the target, then renamed.

A reader never sees half a file: the data is written to a temporary name in the target's directory (a rename
within one file system is atomic), fsync'ed, and renamed onto the target with ``os.replace``. Any failure
(an exception, a full disk, Ctrl-C) removes the temporary file and leaves an existing target as it was; only
a killed process (``kill -9``, power loss) can leave one behind. Temporary names are
``.{name}.tmp-{pid}-{random}`` (hidden, unique per process and call, so writers racing for one target do not
collide) unless the caller names its own (``temp=``), as ``data/indexed.py`` does so that its leftovers can
be traced to a dead writer.

- :func:`atomic_write`: a context manager yielding the open temporary file;
- :func:`write_text_atomic`, :func:`write_bytes_atomic`: a whole file at once;
- :func:`atomic_save`: for writers that take a path (``fig.savefig``, a compiler's ``-o``, a sentencepiece
  model prefix that becomes ``.model`` and ``.vocab``);
- :func:`atomic_dir`: a directory, filled under a temporary sibling name and renamed.

The lowest layer: the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

P = TypeVar("P", str, Path)
"""A path as the caller gave it: a ``str`` stays a ``str``, anything else becomes a ``Path``."""


def _same_kind(like: str | os.PathLike[str], path: str) -> Any:
    return path if isinstance(like, str) else Path(path)


def temp_path_for(path: str | os.PathLike[str]) -> Any:
    """A fresh temporary name in ``path``'s directory: ``.{name}.tmp-{pid}-{random}`` (a ``str`` for a ``str``
    path, else a ``Path``). Nothing is created."""
    head, name = os.path.split(os.fspath(path))
    return _same_kind(path, os.path.join(head, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"))


def _remove(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file written by someone else (a library, a subprocess) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames in the directory ``path`` durable (best effort: not every platform or file system allows
    it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    encoding: str = "utf-8",
    temp: str | os.PathLike[str] | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file for ``path`` (``mode`` ``"w"`` text in ``encoding``, or ``"wb"``); when the body
    returns, fsync it and rename it to ``path``. On any failure, the body's included (KeyboardInterrupt too),
    the temporary file is removed and ``path`` is left as it was. ``temp`` names the temporary file
    (default :func:`temp_path_for`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode {mode!r}, expected 'w' or 'wb'")
    tmp = temp_path_for(path) if temp is None else temp
    try:
        with open(tmp, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: P, text: str, encoding: str = "utf-8") -> P:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return path


def write_bytes_atomic(path: P, data: bytes) -> P:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def atomic_save(
    path: P,
    save: Callable[[P], object],
    *,
    suffixes: Sequence[str] = ("",),
    temp: P | None = None,
) -> P:
    """``save(tmp)`` writes at a temporary name (of ``path``'s kind, :func:`temp_path_for` unless ``temp``
    is given); then each ``tmp + suffix`` is fsync'ed and renamed to ``path + suffix``, in the order of
    ``suffixes``. For a writer that makes several files from one prefix (sentencepiece's ``.model`` and
    ``.vocab``) list their suffixes, the file readers look for last. On any failure every temporary file is
    removed (files already renamed stay). Returns ``path``."""
    tmp = temp_path_for(path) if temp is None else temp
    pairs = [(os.fspath(tmp) + s, os.fspath(path) + s) for s in suffixes]
    try:
        save(tmp)
        for written, _ in pairs:
            fsync_path(written)
        for written, final in pairs:
            os.replace(written, final)
    except BaseException:
        for written, _ in pairs:
            _remove(written)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling directory ``.{name}.{random}``, renamed to ``final`` (replacing a directory there)
    only if the body succeeds; on any failure it is removed and ``final`` is left as it was.

    It is made with ``os.mkdir`` (mode 0777 less the umask, like any directory the user makes: usually
    0755), not ``tempfile.mkdtemp``, whose 0700 would stay on the published directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
