"""Fused kernels: KL divergence (and its vocab-parallel statistics) and scaled masked softmax.

Each op runs the CUDA extension for CUDA tensors when it is built, else the CPU C++ extension (OpenMP), else the
pure PyTorch reference in ``reference.py``; one log line per op (logger ``megatron_ki``) says which. The KL
statistics contract is documented once, on ``KLStat``.
"""

from .build import load_cpu_extension, load_cuda_extension, select_backend
from .kl import (
    KL_MODES,
    KLStat,
    KLTerms,
    fused_kl_div,
    kl_backward,
    kl_forward_stats,
    kl_from_stats,
    merge_kl_stats,
    rescale_kl_stats,
)
from .softmax import scaled_masked_softmax, scaled_upper_triang_masked_softmax

__all__ = [
    "KL_MODES",
    "KLStat",
    "KLTerms",
    "fused_kl_div",
    "kl_backward",
    "kl_forward_stats",
    "kl_from_stats",
    "load_cpu_extension",
    "load_cuda_extension",
    "merge_kl_stats",
    "rescale_kl_stats",
    "scaled_masked_softmax",
    "scaled_upper_triang_masked_softmax",
    "select_backend",
]
