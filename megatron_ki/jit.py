"""Where compiled extensions are built, and whether they are used: one cache and one switch for both builders.

The C++/CUDA kernels (``kernels/build.py``, built with torch's JIT, they need torch's headers) and the dataset
index helpers (``data/helpers.py``, plain pybind11, no torch) share:

    MEGATRON_KI_CACHE=DIR                 build cache root (default ~/.cache/megatron_ki)
    MEGATRON_KI_KERNELS=auto|reference    reference: the PyTorch / NumPy reference everywhere, nothing compiled

Old spellings still work, with one deprecation line: ``MEGATRON_KI_BUILD_DIR`` (the kernels' build root, now
``$MEGATRON_KI_CACHE/torch_extensions``) and ``MEGATRON_KI_NO_CPP=1`` (now ``MEGATRON_KI_KERNELS=reference``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("megatron_ki")

CACHE_ENV = "MEGATRON_KI_CACHE"
SWITCH_ENV = "MEGATRON_KI_KERNELS"
_warned: set[str] = set()


def _deprecated(old: str, new: str) -> None:
    if old not in _warned:
        _warned.add(old)
        logger.warning("%s is deprecated: use %s", old, new)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron_ki")


def torch_extensions_root() -> Path:
    """Root of the torch JIT builds (the kernels)."""
    old = os.environ.get("MEGATRON_KI_BUILD_DIR")
    if old:
        _deprecated("MEGATRON_KI_BUILD_DIR", f"{CACHE_ENV} (builds go to $ {CACHE_ENV}/torch_extensions)")
        return Path(old)
    return cache_root() / "torch_extensions"


def compiled_code_enabled() -> bool:
    """False when ``MEGATRON_KI_KERNELS=reference`` (or the old ``MEGATRON_KI_NO_CPP=1``) asks for the
    reference implementations; a value other than auto/reference is an error naming the variable."""
    value = os.environ.get(SWITCH_ENV, "auto").strip().lower()
    if value not in ("auto", "reference"):
        raise ValueError(f"{SWITCH_ENV} must be 'auto' or 'reference', got {value!r}")
    if os.environ.get("MEGATRON_KI_NO_CPP", "0") not in ("", "0"):
        _deprecated("MEGATRON_KI_NO_CPP=1", f"{SWITCH_ENV}=reference")
        return False
    return value == "auto"


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block ends, then deliver them.

    torch's JIT builds (ours, and DeepSpeed's CPU communication op inside ``deepspeed.init_distributed``) take
    a file lock beside the build; a process killed while holding it leaves the lock behind, and every later
    build on the machine waits for it forever. The launcher SIGTERMs every rank as soon as one fails, often
    while the others are starting up. Main thread only (elsewhere the block runs as it is).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, _f: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            os.kill(os.getpid(), sig)
