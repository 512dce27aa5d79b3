"""Scaled masked softmax for attention (the ``fused_softmax`` attention backend), fused on CPU and CUDA."""

from __future__ import annotations

import torch

from . import reference
from .build import select_backend


def _check_mask(mask: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.is_floating_point():
        raise TypeError(
            "scaled_masked_softmax: mask must be bool (True = masked out), not an additive float mask"
        )
    try:
        torch.broadcast_shapes(mask.shape, scores.shape)
    except RuntimeError as exc:
        raise ValueError(
            f"scaled_masked_softmax: mask {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}"
        ) from exc
    return mask.to(device=scores.device, dtype=torch.bool)


class _FusedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, scores, mask, scale: float, causal: bool):
        probs = ext.softmax_forward(scores, mask, scale, causal)
        ctx.ext, ctx.scale = ext, scale
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        grad = ctx.ext.softmax_backward(grad_probs.to(probs.dtype).contiguous(), probs, ctx.scale)
        return None, grad, None, None, None


def scaled_masked_softmax(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float = 1.0
) -> torch.Tensor:
    """softmax(scores * scale) over the last dim of ``[b, heads, sq, sk]``; ``mask`` True = masked out.

    ``mask`` is bool and broadcastable (``[b, 1, sq, sk]``, ``[b, 1, 1, sk]``, ...) or None. Masked entries are 0;
    fully masked rows are all 0 (not NaN). fp32 math, output in the input dtype. Differentiable.
    """
    if scores.dim() != 4:
        raise ValueError(
            f"scaled_masked_softmax: scores must be [b, heads, sq, sk], got {tuple(scores.shape)}"
        )
    mask = _check_mask(mask, scores)
    _, ext = select_backend("scaled_masked_softmax", scores)
    if ext is None:
        return reference.scaled_masked_softmax_reference(scores, mask, scale)
    return _FusedSoftmax.apply(ext, scores.contiguous(), mask, float(scale), False)


def scaled_upper_triang_masked_softmax(scores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Causal softmax(scores * scale) over ``[..., sq, sk]`` with sq == sk: key j > query i gets 0."""
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(
            f"scaled_upper_triang_masked_softmax: scores must be [..., sq, sk] with sq == sk, got {tuple(scores.shape)}"
        )
    _, ext = select_backend("scaled_upper_triang_masked_softmax", scores)
    if ext is None:
        return reference.scaled_upper_triang_masked_softmax_reference(scores, scale)
    sq = scores.shape[-1]
    x = scores.reshape(1, -1, sq, sq).contiguous()
    return _FusedSoftmax.apply(ext, x, None, float(scale), True).reshape(scores.shape)
