"""Autograd-aware collectives over an explicit tensor-parallel group.

Each function is the identity when ``group`` is None or has one rank, so the same model code runs
single-process. Forward/backward pairs follow Megatron-LM's ``mappings.py``: copy <-> all-reduce,
scatter <-> gather along the last dimension; for sequence parallelism, along the sequence dimension
(``SEQ_DIM`` of ``[batch, seq, hidden]``): scatter <-> all-gather, all-gather <-> reduce-scatter,
reduce-scatter <-> all-gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension forward; all-gather backward."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather the last dimension forward; keep this rank's chunk backward."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def all_reduce_no_grad(x: torch.Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a statistic that carries no gradient (max, sum-exp, counts)."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


# ------------------------------------------------------------------------------ sequence parallelism
SEQ_DIM = 1
"""Activations are ``[batch, seq, hidden]``: the sequence-parallel collectives split and join dimension 1."""


def _split_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x.chunk(group_size(group), dim=SEQ_DIM)[group_rank(group)].contiguous()


def _gather_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    parts = [c.contiguous() for c in x.chunk(group_size(group), dim=SEQ_DIM)]
    out = torch.empty_like(parts[group_rank(group)])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _ScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherFromSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter_seq(grad, ctx.group), None, None
        return _split_seq(grad, ctx.group), None, None


class _ReduceScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def scatter_to_sequence_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the sequence forward; all-gather the gradient backward (entering the
    sequence-parallel region from a replicated tensor, e.g. the embedding's output)."""
    return x if group_size(group) == 1 else _ScatterToSeq.apply(x, group)


def gather_from_sequence_region(
    x: torch.Tensor, group: ProcessGroup | None, reduce_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence forward. Backward: reduce-scatter (the input of a column-parallel layer, whose
    ranks each hold a partial gradient), or with ``reduce_grad=False`` keep this rank's chunk (the consumer
    already made the gradient whole on every rank)."""
    return x if group_size(group) == 1 else _GatherFromSeq.apply(x, group, reduce_grad)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum the ranks' partial results and keep this rank's chunk of the sequence forward (the output of a
    row-parallel layer); all-gather the gradient backward."""
    return x if group_size(group) == 1 else _ReduceScatterToSeq.apply(x, group)
