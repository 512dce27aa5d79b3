"""Is every token id of the training data below the model's vocabulary size?

An embedding lookup with an id >= ``vocab_size`` fails on one rank, or (vocab-parallel embedding, tensor
parallel >= 2) is masked to zeros and trains silently on garbage. :func:`check_token_range` refuses such data
before training starts, naming the dataset, the largest id and the vocabulary.

The largest id comes, cheapest first, from the ``{prefix}.stats.json`` sidecar that tools/preprocess_data.py
and tools/merge_datasets.py write; from a cached earlier scan; or from one chunked pass over the ``.bin``
(datasets made by Megatron's own tools), whose result is cached in ``cache_dir`` or, when that is None, as
the sidecar beside the data if that directory is writable. Every record holds the size and mtime of the
``.bin`` it describes, so a rewritten file is scanned again.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from megatron_ki.data.indexed import (
    IndexedDataset,
    bin_path,
    read_stats,
    stats_path,
    write_stats,
)
from megatron_ki.errors import MegatronKIError

log = logging.getLogger(__name__)

_SCAN_BYTES = 64 << 20
"""Bytes of ``.bin`` reduced per step of a scan."""


class TokenRangeError(MegatronKIError, ValueError):
    """A dataset holds token ids outside the model's vocabulary."""


def dataset_prefixes(data) -> list[str]:
    """The dataset prefixes of ``data.data_path`` (a DataConfig), or of a data_path list or string itself
    (``[prefix]`` or Megatron's ``[w1, prefix1, w2, prefix2, ...]``)."""
    from megatron_ki.data.blending import parse_data_path  # imports torch: only when asked

    data_path = getattr(data, "data_path", data)
    return parse_data_path(data_path)[1]


def cache_path(prefix: str, cache_dir: str | None) -> str:
    """Where the scan result of ``prefix`` is cached: in ``cache_dir``, keyed by the absolute ``.bin`` path,
    else the sidecar ``{prefix}.stats.json``."""
    if cache_dir is None:
        return stats_path(prefix)
    source = os.path.abspath(bin_path(prefix))
    digest = hashlib.md5(source.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{os.path.basename(prefix)}-{digest}.stats.json")


def scan_token_stats(prefix: str) -> dict:
    """One chunked pass over ``{prefix}.bin`` (dtype from the ``.idx``): token count and id range."""
    ds = IndexedDataset(prefix)
    tokens = np.frombuffer(ds._bin_map, dtype=ds.dtype)
    low = high = None
    step = max(1, _SCAN_BYTES // ds.dtype.itemsize)
    for lo in range(0, tokens.size, step):
        chunk = tokens[lo : lo + step]
        c_low, c_high = int(chunk.min()), int(chunk.max())
        low = c_low if low is None else min(low, c_low)
        high = c_high if high is None else max(high, c_high)
    return {
        "dtype": ds.dtype.name,
        "num_tokens": int(tokens.size),
        "num_sequences": len(ds),
        "num_documents": ds.num_documents,
        "min_token_id": low,
        "max_token_id": high,
        "source": "scan",
    }


def token_stats(prefix: str, cache_dir: str | None = None) -> dict:
    """Token count and id range of a dataset: from its sidecar, a cached scan, or a new (cached) scan."""
    prefix = os.fspath(prefix)
    known = read_stats(prefix)
    if known is None and cache_dir is not None:
        known = read_stats(prefix, cache_path(prefix, cache_dir))
    if known is not None:
        return known
    before = os.stat(bin_path(prefix))
    log.info("scanning %s for its largest token id (once; the result is cached)", bin_path(prefix))
    stats = scan_token_stats(prefix)
    after = os.stat(bin_path(prefix))
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return stats  # rewritten while being scanned: nothing to cache
    path = cache_path(prefix, cache_dir)
    try:
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
        write_stats(prefix, stats, path)
    except OSError as e:  # a read-only data directory: scan again next time
        log.debug("not caching the token range of %s in %s: %s", prefix, path, e)
    return stats


def max_token_id(prefix: str, cache_dir: str | None = None) -> int:
    """The largest token id in ``{prefix}.bin`` (-1 for a dataset without tokens)."""
    high = token_stats(prefix, cache_dir)["max_token_id"]
    return -1 if high is None else int(high)


def check_token_range(prefixes: list[str], vocab_size: int, cache_dir: str | None = None) -> None:
    """Raise :class:`TokenRangeError` if a dataset holds a token id outside ``[0, vocab_size)``.

    The message names the dataset, the offending id and ``model.vocab_size``, e.g. ``data.data_path:
    /d/x_text_document holds token id 600, but model.vocab_size is 512 (ids must be < 512)``.
    """
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise TokenRangeError(
                f"data.data_path: {prefix}: no {' or '.join(prefix + e for e in missing)}; expected a dataset "
                "prefix written by tools/preprocess_data.py (the .bin/.idx pair without its extension)"
            )
        stats = token_stats(prefix, cache_dir)
        high, low = stats["max_token_id"], stats["min_token_id"]
        if high is not None and high >= vocab_size:
            raise TokenRangeError(
                f"data.data_path: {prefix} holds token id {high}, but model.vocab_size is {vocab_size} "
                f"(ids must be < {vocab_size}); it was tokenized with a larger vocabulary: set "
                "model.vocab_size to that tokenizer's size or preprocess the data with the model's tokenizer"
            )
        if low is not None and low < 0:
            raise TokenRangeError(
                f"data.data_path: {prefix} holds token id {low}, but token ids must be >= 0 "
                f"(and < model.vocab_size {vocab_size}); the .bin is not token data of this vocabulary"
            )
