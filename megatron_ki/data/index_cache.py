"""On-disk cache of dataset index arrays, built once by one rank while the others wait.

Arrays are stored as ``{cache_dir}/{digest}-{name}.npy`` where the digest hashes every parameter the
arrays depend on, with a ``.json`` beside them that records those parameters in clear. Files are written
under temporary names and renamed, so a crash never leaves a half-written index that later runs would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable

import numpy as np

from megatron_ki.fileio import atomic_write

INDEX_VERSION = 1
"""Bump when the layout of cached indices changes: old caches are then rebuilt, never misread."""

log = logging.getLogger(__name__)


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def file_fingerprint(path: str, block: int = 1 << 16) -> str:
    """Size plus a hash of the first and last ``block`` bytes: cheap, and changes when a file is rewritten."""
    size = os.path.getsize(path)
    h = hashlib.md5(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()


def describe_dataset(
    kind: str, indexed, documents: np.ndarray, name: str, seq_length: int, num_samples: int | None, seed: int
) -> dict:
    """What a dataset's cached indices depend on; its hash names the cache files."""
    return {
        "class": kind,
        "version": INDEX_VERSION,
        "name": name,
        "prefix": os.path.abspath(indexed.prefix),
        "idx": file_fingerprint(indexed.prefix + ".idx"),
        "documents": [int(documents[0]), int(documents[-1]), int(documents.size), int(documents.sum())],
        "seq_length": seq_length,
        "num_samples": num_samples,
        "seed": seed,
    }


def default_cache_dir(cache_dir: str | None, prefix: str) -> str | None:
    """``""`` means ``index-cache/`` beside the data; None keeps indices in memory only."""
    if cache_dir == "":
        return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
    return cache_dir


def cache_paths(cache_dir: str, description: dict, names: list[str]) -> tuple[str, dict[str, str]]:
    """The digest of ``description`` and the ``.npy`` path of each array name."""
    text = json.dumps(description, sort_keys=True)
    digest = hashlib.md5(text.encode()).hexdigest()
    return digest, {n: os.path.join(cache_dir, f"{digest}-{n}.npy") for n in names}


def _save(paths: dict[str, str], arrays: dict[str, np.ndarray], description: dict, digest: str) -> None:
    cache_dir = os.path.dirname(next(iter(paths.values())))
    os.makedirs(cache_dir, exist_ok=True)
    for name, path in paths.items():
        with atomic_write(path, "wb") as f:
            np.save(f, arrays[name], allow_pickle=False)
    with atomic_write(os.path.join(cache_dir, f"{digest}-description.json")) as f:
        json.dump(description, f, indent=1, sort_keys=True)


def load_or_build(
    cache_dir: str | None, description: dict, names: list[str], build: Callable[[], dict[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], bool]:
    """Return the arrays (memory-mapped) and whether this process built them.

    With torch.distributed initialised, rank 0 builds while the others wait at a barrier; every rank must
    call this with the same description. A rank that still finds no file afterwards (no shared filesystem)
    builds its own copy. ``cache_dir=None`` builds in memory without caching.
    """
    if cache_dir is None:
        return build(), True
    digest, paths = cache_paths(cache_dir, description, names)
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    built = False

    def have() -> bool:
        return all(os.path.isfile(p) for p in paths.values())

    if rank == 0 and not have():
        log.info("building dataset indices %s in %s", description.get("name", ""), cache_dir)
        _save(paths, build(), description, digest)
        built = True
    if dist is not None:
        dist.barrier()
    if not have():
        _save(paths, build(), description, digest)
        built = True
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}, built
