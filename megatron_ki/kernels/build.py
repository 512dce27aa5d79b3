"""Just-in-time build and loading of the C++ (CPU) and CUDA extensions, and the one-line path log.

One extension module holds every CPU op (``csrc/*.cpp`` compiled together, -O3 -fopenmp), built once per
machine type into ``$MEGATRON_KI_CACHE/torch_extensions`` (``megatron_ki/jit.py``) and reused by every later
process (torch's file lock keeps concurrent builders safe). The CUDA module is only built where a CUDA torch
and toolkit exist. ``MEGATRON_KI_KERNELS=reference`` forces the PyTorch reference everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch

from megatron_ki.jit import compiled_code_enabled, signals_deferred, torch_extensions_root

from .selfcheck import verified  # imported with the kernels: it holds the reference functions as they are

logger = logging.getLogger("megatron_ki")

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("cpu_bindings.cpp", "fused_kl.cpp", "scaled_masked_softmax.cpp")
CUDA_SOURCES = ("cuda_bindings.cpp", "fused_kl_cuda.cu", "scaled_masked_softmax_cuda.cu")

_logged: set[str] = set()


def build_dir(name: str) -> Path:
    """Directory of one extension's build, keyed by torch version so a torch upgrade rebuilds, and by the
    checkout and torch install it compiles against: two checkouts or virtualenvs on one machine would
    otherwise rewrite each other's build (their include paths differ) and rebuild on every switch."""
    where = hashlib.sha256(f"{CSRC}|{Path(torch.__file__).parent}".encode()).hexdigest()[:10]
    path = torch_extensions_root() / f"torch{torch.__version__.replace('+', '_')}" / f"{name}-{where}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _x86_simd_flags() -> list[str]:
    """AVX2/FMA/F16C flags when this CPU has them (read from /proc/cpuinfo), else baseline code."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


def kernels_disabled() -> bool:
    """True when ``MEGATRON_KI_KERNELS=reference`` asks for the PyTorch reference only."""
    return not compiled_code_enabled()


@functools.cache
def load_cpu_extension() -> ModuleType | None:
    """The compiled CPU op module, or None (build failed or disabled; the reason is logged once)."""
    if kernels_disabled():
        return None
    missing = [s for s in CPU_SOURCES if not (CSRC / s).is_file()]
    if missing:
        logger.warning("megatron_ki kernels: %s missing under %s; using the PyTorch reference", missing, CSRC)
        return None
    simd = _x86_simd_flags()
    name = "megatron_ki_cpu" + ("_avx2" if simd else "")
    try:
        from torch.utils.cpp_extension import load

        with signals_deferred():  # a kill inside the build would leave its lock file behind
            return load(
                name=name,
                sources=[str(CSRC / s) for s in CPU_SOURCES],
                extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *simd],
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir(name)),
                verbose=False,
            )
    except Exception as exc:  # a missing compiler must not stop training: the reference still works
        logger.warning(
            "megatron_ki kernels: building the CPU extension failed (%s); using the reference", exc
        )
        return None


@functools.cache
def load_cuda_extension() -> ModuleType | None:
    """The compiled CUDA op module where a CUDA torch and toolkit exist, else None."""
    if kernels_disabled() or not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import CUDA_HOME, load

        if CUDA_HOME is None:
            logger.warning("megatron_ki kernels: CUDA_HOME not found; CUDA tensors use the PyTorch reference")
            return None
        with signals_deferred():  # a kill inside the build would leave its lock file behind
            return load(
                name="megatron_ki_cuda",
                sources=[str(CSRC / s) for s in CUDA_SOURCES],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-std=c++17"],
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir("megatron_ki_cuda")),
                verbose=False,
            )
    except Exception as exc:
        logger.warning(
            "megatron_ki kernels: building the CUDA extension failed (%s); using the reference", exc
        )
        return None


def select_backend(op: str, x: torch.Tensor) -> tuple[str, ModuleType | None]:
    """(path name, module) for running ``op`` on ``x``: CUDA op, else CPU op, else the reference (None).

    Logs one INFO line per op per process naming the path taken. A compiled op is used only once it agreed
    with the PyTorch reference on the start-up check (``selfcheck.py``); otherwise the reference runs.
    """
    if x.is_cuda:
        ext, path = load_cuda_extension(), "CUDA extension"
    elif x.device.type == "cpu":
        ext, path = load_cpu_extension(), "CPU C++ extension"
    else:
        ext, path = None, ""
    # a compiled op is checked once per op family and device type (forward, backward, edge cases)
    if ext is not None and not verified(ext, op, x.device, path):
        ext = None
    if ext is None:
        path = "PyTorch reference"
    if op not in _logged:
        _logged.add(op)
        logger.info("megatron_ki kernels: %s runs on the %s (%s tensors)", op, path, x.device.type)
    return path, ext
