"""Tensor-parallel linear and embedding layers (Megatron-LM's column/row/vocab split).

Initialisation is layout-independent: every rank draws the *full* weight from the generator it is given
(seeded identically on all TP ranks) and keeps its shard, so a model built at tp=4 holds exactly the
shards of the model built at tp=1 with the same seed. Weights are ``[out, in]`` like ``nn.Linear``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from .mappings import (
    _gather_seq,
    _reduce_scatter_seq,
    copy_to_tp_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tp_region,
)

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float) -> InitMethod:
    def init(t: torch.Tensor) -> None:
        nn.init.normal_(t, mean=0.0, std=std)

    return init


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """GPT-2 / Megatron output-projection init: std / sqrt(2 x layers)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator`` (a size split over ``denominator`` tensor-parallel ranks); a ValueError
    naming ``what`` when it does not divide evenly."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


def shard_rows(full: torch.Tensor, sizes: Sequence[int], tp: int, rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's part of ``full`` along ``dim`` when that dim is a concatenation of ``sizes`` segments,
    each split evenly over ``tp`` ranks (fused QKV or gate/up weights keep their segments per rank)."""
    segments = torch.split(full, list(sizes), dim=dim)
    return torch.cat([seg.chunk(tp, dim=dim)[rank] for seg in segments], dim=dim)


def unshard_rows(shards: Sequence[torch.Tensor], sizes: Sequence[int], dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`shard_rows`: rebuild the full tensor from every rank's shard."""
    tp = len(shards)
    local = [s // tp for s in sizes]
    per_rank = [torch.split(sh, local, dim=dim) for sh in shards]
    return torch.cat([torch.cat([pr[i] for pr in per_rank], dim=dim) for i in range(len(sizes))], dim=dim)


def _init_sharded(
    param: torch.Tensor,
    full_shape: tuple[int, ...],
    init: InitMethod,
    sizes: Sequence[int],
    dim: int,
    tp: int,
    rank: int,
) -> None:
    full = torch.empty(full_shape, dtype=torch.float32)
    init(full)
    with torch.no_grad():
        param.copy_(shard_rows(full, sizes, tp, rank, dim=dim))


class _SequenceGatherLinear(torch.autograd.Function):
    """``F.linear(all_gather_seq(x), w, b)`` that saves the sequence chunk ``x``, not the gathered input, and
    gathers it again in backward (Megatron-LM's sequence-parallel linear): the activation memory stays 1/tp."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_gather_seq(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = _gather_seq(x, ctx.group)
        grad_x = _reduce_scatter_seq(grad.matmul(weight), ctx.group)
        g2, t2 = grad.reshape(-1, grad.shape[-1]), total.reshape(-1, total.shape[-1])
        grad_w = g2.t().matmul(t2)
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A split along its output rows: each rank computes its slice of Y.

    ``output_sizes`` describes a fused weight (e.g. ``[q, k, v]``): each segment is split over the ranks
    separately so a rank holds ``[q_r, k_r, v_r]``. ``sequence_parallel``: the input is this rank's chunk of
    the sequence, all-gathered before the product (its gradient reduce-scattered), as in Megatron-LM.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        group: ProcessGroup | None = None,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        output_sizes: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel and gather_output do not go together")
        self.group = group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        if sum(self.output_sizes) != output_size:
            raise ValueError(f"output_sizes {self.output_sizes} must add up to output_size {output_size}")
        tp, rank = group_size(group), group_rank(group)
        for s in self.output_sizes:
            divide(s, tp, "column-parallel output size")
        self.output_size_per_partition = output_size // tp
        self.weight = nn.Parameter(
            torch.empty(self.output_size_per_partition, input_size, dtype=dtype, device=device)
        )
        _init_sharded(
            self.weight,
            (output_size, input_size),
            init_method or normal_init(0.02),
            self.output_sizes,
            0,
            tp,
            rank,
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        if self.bias is not None:
            self.bias.tensor_model_parallel = True
            self.bias.partition_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and group_size(self.group) > 1:
            return _SequenceGatherLinear.apply(x, self.weight, self.bias, self.group)
        x = copy_to_tp_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tp_region(y, self.group)
        tp = group_size(self.group)
        if tp > 1 and len(self.output_sizes) > 1:  # rank order [q0 k0 v0 q1 ...] -> the full weight's [q k v]
            y = unshard_rows(y.chunk(tp, dim=-1), self.output_sizes, dim=-1)
        return y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}"


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A split along its input columns; partial products are all-reduced.

    The bias is added once, after the reduction, and is replicated on every rank. ``sequence_parallel``: the
    partial products are reduce-scattered over the sequence instead (each rank keeps its chunk), and the
    bias's gradient, now from one chunk per rank, is all-reduced over the group.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        group: ProcessGroup | None = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel")
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        tp, rank = group_size(group), group_rank(group)
        self.input_size_per_partition = divide(input_size, tp, "row-parallel input size")
        self.weight = nn.Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=dtype, device=device)
        )
        _init_sharded(
            self.weight,
            (output_size, input_size),
            init_method or normal_init(0.02),
            [input_size],
            1,
            tp,
            rank,
        )
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 1
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(F.linear(x, self.weight), self.group)
            return y if self.bias is None else y + copy_to_tp_region(self.bias, self.group)
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, in_per_partition={self.input_size_per_partition}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split in contiguous ranges over the TP ranks.

    Each rank looks up the ids in its range (others give zeros) and the results are all-reduced.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: ProcessGroup | None = None,
        init_method: InitMethod | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        tp, rank = group_size(group), group_rank(group)
        self.num_embeddings_per_partition = divide(num_embeddings, tp, "vocabulary size")
        self.vocab_start = rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype, device=device)
        )
        _init_sharded(
            self.weight,
            (num_embeddings, embedding_dim),
            init_method or normal_init(0.02),
            [num_embeddings],
            0,
            tp,
            rank,
        )
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, per_partition={self.num_embeddings_per_partition}"
        )
