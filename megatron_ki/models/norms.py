"""LayerNorm and RMSNorm with fp32 statistics whatever the activation dtype.

If NVIDIA apex is importable its fused kernels run (they also keep fp32 statistics); otherwise the PyTorch
path below runs. One log line (logger ``megatron_ki``) says which, the first time a norm is built.

``grad_group``: the norm runs on this rank's chunk of the sequence (sequence parallelism), so each rank's
weight gradient covers its chunk only; the weights pass through ``copy_to_tp_region``, whose backward sums
the gradients over the group (Megatron-LM all-reduces these "sequence-parallel" gradients after backward).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_ki.tensor_parallel import copy_to_tp_region

logger = logging.getLogger("megatron_ki")

_APEX: tuple | None = None
_LOGGED = False


def _apex_norms() -> tuple | None:
    """Import apex's fused norms once; log the path taken exactly once per process."""
    global _APEX, _LOGGED
    if not _LOGGED:
        try:
            from apex.normalization.fused_layer_norm import (  # type: ignore[import-not-found]
                fused_layer_norm_affine,
                fused_rms_norm_affine,
            )

            _APEX = (fused_layer_norm_affine, fused_rms_norm_affine)
            logger.info("megatron_ki.models.norms: using apex fused LayerNorm/RMSNorm")
        except Exception:
            _APEX = None
            logger.info(
                "megatron_ki.models.norms: apex not importable, using PyTorch LayerNorm/RMSNorm (fp32 stats)"
            )
        _LOGGED = True
    return _APEX


class LayerNorm(nn.Module):
    """LayerNorm over the last dim; statistics in fp32, output in the input's dtype (HF/Megatron numerics)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
        grad_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.hidden_size = hidden_size
        self.grad_group = grad_group
        apex = _apex_norms()
        self._fused = apex[0] if apex is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (
            copy_to_tp_region(self.weight, self.grad_group),
            copy_to_tp_region(self.bias, self.grad_group),
        )
        if self._fused is not None and x.is_cuda:
            return self._fused(x, weight, bias, (self.hidden_size,), self.eps)
        if x.dtype == torch.float32:
            return F.layer_norm(x, (self.hidden_size,), weight, bias, self.eps)
        y = F.layer_norm(x.float(), (self.hidden_size,), weight.float(), bias.float(), self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (Llama): ``weight * x / sqrt(mean(x^2) + eps)``; statistics in fp32 like HF's LlamaRMSNorm."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        dtype: torch.dtype = torch.float32,
        grad_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.hidden_size = hidden_size
        self.grad_group = grad_group
        apex = _apex_norms()
        self._fused = apex[1] if apex is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tp_region(self.weight, self.grad_group)
        if self._fused is not None and x.is_cuda:
            return self._fused(x, weight, (self.hidden_size,), self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)


def build_norm(
    kind: str, hidden_size: int, eps: float, dtype: torch.dtype, grad_group: ProcessGroup | None = None
) -> nn.Module:
    """The norm named by ``ModelConfig.normalization`` ('layernorm' or 'rmsnorm'); ``grad_group``: it runs on
    a chunk of the sequence and its weight gradients are summed over that group (sequence parallelism)."""
    if kind == "layernorm":
        return LayerNorm(hidden_size, eps, dtype, grad_group)
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps, dtype, grad_group)
    raise ValueError(f"model.normalization: expected 'layernorm' or 'rmsnorm', got {kind!r}")
