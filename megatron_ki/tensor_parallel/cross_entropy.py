"""Cross-entropy over logits whose vocabulary is split across tensor-parallel ranks.

Statistics are fp32 whatever the logits' dtype. Communication: three all-reduces of ``[tokens]``-sized
fp32 tensors (max, target logit, sum-exp); nothing ``[tokens, vocab]``-sized crosses ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .mappings import all_reduce_no_grad, group_rank


def _owned_targets(
    target: torch.Tensor, valid: torch.Tensor, start: int, vocab_local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local index [..., 1], owned)``: where each valid target falls in this rank's vocabulary slice
    ``[start, start + vocab_local)``, index 0 where another rank owns it."""
    local_t = target - start
    owned = valid & (local_t >= 0) & (local_t < vocab_local)
    return local_t.masked_fill(~owned, 0).unsqueeze(-1), owned


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, ignore_index: int):
        vocab_local = logits.shape[-1]
        start = group_rank(group) * vocab_local
        x = logits.float()
        row_max = x.max(dim=-1).values
        all_reduce_no_grad(row_max, group, op=dist.ReduceOp.MAX)
        shifted = x - row_max.unsqueeze(-1)

        valid = target != ignore_index
        idx, in_range = _owned_targets(target, valid, start, vocab_local)
        target_logit = shifted.gather(-1, idx).squeeze(-1).masked_fill(~in_range, 0.0)
        all_reduce_no_grad(target_logit, group)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        all_reduce_no_grad(sum_exp, group)
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)

        if ctx.needs_input_grad[0]:  # a frozen teacher's loss needs no softmax for a gradient
            exp.div_(sum_exp.unsqueeze(-1))  # softmax, reused for the gradient
            ctx.save_for_backward(exp, idx, in_range, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, idx, in_range, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, idx, -in_range.unsqueeze(-1).to(grad.dtype))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_target_logit(
    logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """``logits[..., target]`` (fp32, 0 at ``ignore_index``) of vocab-sharded ``logits``: the rank owning
    each target contributes it, one all-reduce of ``[tokens]``. No gradient."""
    vocab_local = logits.shape[-1]
    idx, owned = _owned_targets(target, target != ignore_index, group_rank(group) * vocab_local, vocab_local)
    picked = logits.detach().gather(-1, idx).squeeze(-1).float().masked_fill(~owned, 0.0)
    all_reduce_no_grad(picked, group)
    return picked


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: ProcessGroup | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy (fp32, 0 at ``ignore_index``) of vocab-sharded ``logits`` ``[..., V/tp]``.

    Equals ``F.cross_entropy(gathered_logits, target, reduction='none', ignore_index=...)``.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)
