"""The on-disk format of a framework checkpoint: its names, its metadata, and the readers and writers of both.

A checkpoint directory holds ``latest`` (the name of the published tag) and one folder per tag with
DeepSpeed's files (``mp_rank_{tp:02d}_model_states.pt``, key ``module``, when pp = 1, or
``layer_{idx:02d}-model_{tp:02d}-model_states.pt`` per pipeline layer when pp > 1; ZeRO's optimizer states;
``rng/rank{r:05d}.pt``) and the framework's ``meta.json``: ``format_version``, ``step``,
``consumed_samples``, ``layout`` (tp, pp, dp, zero_stage), ``weights_only``, the run's ``config``, and what
the writer adds. ``training/checkpoint.py`` saves and resumes checkpoints, ``convert/reshard.py`` converts
them; both read and write the format through this module. Errors name the file.

Below the model code: the standard library, torch, ``megatron_ki.errors``, ``fileio`` and ``config`` only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import pickle
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch

from megatron_ki.config import Config, config_from_dict, upgrade_stored_config
from megatron_ki.errors import MegatronKIError, describe_os_error
from megatron_ki.fileio import write_text_atomic

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"


class CheckpointError(MegatronKIError, ValueError):
    """A checkpoint is missing, incomplete or does not fit; the message names the file."""


# ------------------------------------------------------------------------------------------ reading
def read_latest(root: str | Path) -> str | None:
    """The tag ``latest`` names (stripped), or None when there is no ``latest`` file."""
    path = Path(root) / LATEST_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's are paragraphs), with the next one when it
    ends in a colon (``Error(s) in loading state_dict for GPTModel:``), or the exception's type."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def read_meta_file(path: Path) -> dict[str, Any]:
    """A tag's ``meta.json``, checked for the entries every reader needs; errors name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a megatron_ki checkpoint (or an interrupted save)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({first_line(e)}): the file is truncated or corrupt, expected the metadata "
            "a save writes"
        ) from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(meta).__name__}, expected an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    for key in ("layout", "config"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{path}: no '{key}' object: truncated or not a megatron_ki checkpoint")
    return meta


def read_meta(root: str | Path, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(tag, meta)`` of ``tag`` (default the one ``latest`` names) under the checkpoint directory ``root``."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise CheckpointError(f"checkpoint directory not found: {root} ({what})")
    given = tag
    tag = tag or read_latest(root)
    if tag is None:
        raise CheckpointError(f"{root} has no '{LATEST_FILE}' file: not a published checkpoint")
    if not tag:
        raise CheckpointError(f"{root / LATEST_FILE} is empty: expected the name of a checkpoint tag")
    if not (root / tag).is_dir():
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / META_FILE).is_file())
        found = f"tags there: {', '.join(tags)}" if tags else "no tag there has a meta.json"
        named = f"--tag {tag}" if given else f"'{LATEST_FILE}' names {tag}"
        raise CheckpointError(f"{root}: {named}, but {root / tag} does not exist ({found})")
    return tag, read_meta_file(root / tag / META_FILE)


def meta_config(meta: dict[str, Any]) -> Config:
    """The run config stored in a checkpoint's metadata (one written by an older version included)."""
    return config_from_dict(upgrade_stored_config(meta["config"]))


def load_torch_file(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` to CPU, memory-mapped when asked and the file allows it (pages are read on use).

    A missing, truncated or corrupt file raises :class:`CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            pass  # a legacy (non-zip) file cannot be memory-mapped; a broken one fails again below
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} {torch_file_problem(path) or f'cannot be read ({first_line(e)})'}"
        ) from e


def torch_file_problem(path: Path) -> str | None:
    """None if ``path`` looks like a complete ``torch.save`` file, else what is wrong with it.

    Cheap: it reads the zip archive's central directory at the end of the file (a truncated file has none),
    not the tensors. A legacy (pre-zip) pickle file cannot be checked this way and passes."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if not head:
            return "is empty (truncated)"
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "is truncated or corrupt (an empty zip archive)"
    except FileNotFoundError:
        return "is missing"
    except zipfile.BadZipFile as e:
        if head[:1] == b"\x80":  # a pickle protocol marker: torch's legacy format
            return None
        return f"is truncated or corrupt (not a readable zip archive: {first_line(e)})"
    except OSError as e:
        return f"cannot be read ({e.strerror or first_line(e)})"
    return None


# ------------------------------------------------------------------------------------------ writing
def write_meta(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write a tag's ``meta.json`` into ``folder`` atomically: ``format_version`` first, then ``meta``."""
    return write_text_atomic(
        Path(folder) / META_FILE, json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2)
    )


def write_latest(root: str | Path, tag: str) -> Path:
    """Publish ``tag``: rewrite ``root/latest`` atomically."""
    return write_text_atomic(Path(root) / LATEST_FILE, tag)


# -------------------------------------------------------------------------------- write failures
def is_serialization_error(e: BaseException) -> bool:
    """A ``torch.save`` failure (a full disk shows up as ``unexpected pos 311872 vs 311760``, without errno)."""
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed")
    )


def bytes_written(folder: Path) -> int:
    """Total size of the regular files under ``folder`` (0 if it does not exist)."""
    total = 0
    for p in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def write_failure(e: BaseException, directory: Path, written: int) -> str:
    """Why writing ``written`` bytes under ``directory`` failed, in words. Call it before removing what was
    written: a full disk (ENOSPC, or less free space than twice what was written) says so, with the free
    space; otherwise the OS error with its file, or the first line of torch's message."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free: int | None = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and written and free < 2 * written):
        space = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        return (
            f"no space left on device{where} ({space}, {written / 2**20:.1f} MiB written before the failure)"
        )
    if isinstance(e, OSError):
        return describe_os_error(e)
    if is_serialization_error(e) and free is not None:  # torch's message gives no cause: is the disk full?
        return f"{first_line(e)} ({free / 2**20:.0f} MiB free on its disk)"
    return first_line(e)


def zero_partition_files(folder: Path, mp_rank: int, dp: int) -> list[Path]:
    """The optimizer partitions DeepSpeed saved for model-parallel rank ``mp_rank``, one per data-parallel rank
    (ZeRO's ``zero_pp_rank_*``, the BF16 optimizer's ``bf16_zero_pp_rank_*``, fp16's ``fp16_...``)."""
    for prefix in ("", "bf16_", "fp16_"):
        files = [
            Path(folder) / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt"
            for d in range(dp)
        ]
        if all(f.is_file() for f in files):
            return files
    raise CheckpointError(
        f"{folder}: no ZeRO/BF16 optimizer partitions of model-parallel rank {mp_rank} for its {dp} data-parallel "
        f"ranks (expected [bf16_]zero_pp_rank_0..{dp - 1}_mp_rank_{mp_rank:02d}_optim_states.pt)"
    )
