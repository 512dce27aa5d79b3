"""Tensor parallelism: collectives (mappings), sharded layers, vocab-parallel cross-entropy, RNG."""

from .cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_target_logit
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    normal_init,
    scaled_normal_init,
    shard_rows,
    unshard_rows,
)
from .mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
)
from .random import TPRngTracker, seed_everything

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TPRngTracker",
    "VocabParallelEmbedding",
    "copy_to_tp_region",
    "divide",
    "gather_from_sequence_region",
    "gather_from_tp_region",
    "group_rank",
    "group_size",
    "normal_init",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_region",
    "scaled_normal_init",
    "scatter_to_sequence_region",
    "scatter_to_tp_region",
    "seed_everything",
    "shard_rows",
    "unshard_rows",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_target_logit",
]
