"""Dataset index builders: the compiled ``csrc/helpers.cpp`` when it can be built, else NumPy.

The C++ extension is plain pybind11 (no torch headers), compiled once per source hash with the system C++
compiler into ``$MEGATRON_KI_CACHE`` (``megatron_ki/jit.py``), and renamed into place atomically so ranks that
race to build it are safe. ``MEGATRON_KI_KERNELS=reference`` forces NumPy. One log line says which runs.
Both paths return identical arrays (tests/test_data_helpers.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import sysconfig
from functools import cache
from types import ModuleType

import numpy as np

from megatron_ki.fileio import atomic_save
from megatron_ki.jit import cache_root, compiled_code_enabled

log = logging.getLogger(__name__)

SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "helpers.cpp"
)
MODULE_NAME = "megatron_ki_data_helpers"


def _compile(source: str) -> str:
    """Compile ``source`` if no build of this exact source exists; returns the shared-object path."""
    import pybind11

    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read() + sys.version.encode()).hexdigest()[:16]
    out_dir = os.path.join(cache_root(), f"helpers-{digest}")
    so = os.path.join(out_dir, MODULE_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if os.path.isfile(so):
        return so
    os.makedirs(out_dir, exist_ok=True)
    cxx = os.environ.get("CXX", "c++")

    def build(tmp: str) -> None:
        cmd = [
            cxx,
            "-O3",
            "-shared",
            "-std=c++17",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            source,
            "-o",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")

    return atomic_save(so, build)


@cache
def load_cpp() -> ModuleType | None:
    """The compiled helpers, or None (with the reason logged) when they cannot be built or loaded."""
    if not compiled_code_enabled():
        log.info("dataset helpers: NumPy (MEGATRON_KI_KERNELS=reference)")
        return None
    try:
        so = _compile(SOURCE)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, so)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # no compiler, no pybind11, read-only cache ...: fall back, say why
        log.warning("dataset helpers: NumPy (C++ helpers unavailable: %s)", str(e).splitlines()[0][:300])
        return None
    log.info("dataset helpers: C++ (%s)", so)
    return module


# ----------------------------------------------------------------------------------------- NumPy
def build_sample_idx_numpy(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """Row ``i`` = (position in ``doc_idx``, offset) of the first token of sample ``i``; ``num_samples + 1`` rows.

    Sample ``i`` spans global tokens ``[i * seq_length, (i + 1) * seq_length]`` of the documents concatenated
    in ``doc_idx`` order.
    """
    if seq_length <= 0:
        raise ValueError("build_sample_idx: seq_length must be positive")
    lengths = np.asarray(sizes)[np.asarray(doc_idx, dtype=np.int64)].astype(np.int64)
    starts = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if num_samples * seq_length > starts[-1] - 1:
        raise ValueError("build_sample_idx: not enough tokens for num_samples samples")
    targets = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(starts, targets, side="right") - 1
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = pos
    out[:, 1] = targets - starts[pos]
    return out


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blending: each position goes to the dataset lagging its target share the most."""
    w = [float(x) for x in np.asarray(weights, dtype=np.float64)]
    current = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    n = len(w)
    for i in range(size):
        denom = float(i if i > 1 else 1)
        best, best_err = 0, w[0] * denom - current[0]
        for d in range(1, n):
            err = w[d] * denom - current[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = current[best]
        current[best] += 1
    return dataset_index, dataset_sample_index


# ------------------------------------------------------------------------------------ dispatchers
def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int, use_cpp: bool | None = None
) -> np.ndarray:
    mod = load_cpp() if use_cpp is not False else None
    if mod is not None:
        return mod.build_sample_idx(
            np.ascontiguousarray(sizes, dtype=np.int32),
            np.ascontiguousarray(doc_idx, dtype=np.int64),
            int(seq_length),
            int(num_samples),
        )
    if use_cpp:
        raise RuntimeError("C++ dataset helpers requested but unavailable (see the log)")
    return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples)


def build_blending_indices(
    weights: np.ndarray, size: int, use_cpp: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    mod = load_cpp() if use_cpp is not False else None
    if mod is not None:
        return mod.build_blending_indices(np.ascontiguousarray(weights, dtype=np.float64), int(size))
    if use_cpp:
        raise RuntimeError("C++ dataset helpers requested but unavailable (see the log)")
    return build_blending_indices_numpy(weights, size)
