"""Knowledge Inheritance: the vocab-parallel KD loss and the schedule of its weight a_t."""

from .fused_head import fused_head_ki_loss
from .loss import (
    DIVERGENCES,
    KILossOutput,
    all_reduce_kl_stats,
    ki_loss,
    loss_positions,
    per_token_divergence,
)
from .schedule import SCHEDULES, KISchedule, build_schedule
from .sparse_loss import sparse_kd_loss, sparse_ki_loss, sparse_per_token_divergence

__all__ = [
    "DIVERGENCES",
    "SCHEDULES",
    "KILossOutput",
    "KISchedule",
    "all_reduce_kl_stats",
    "build_schedule",
    "fused_head_ki_loss",
    "ki_loss",
    "loss_positions",
    "per_token_divergence",
    "sparse_kd_loss",
    "sparse_ki_loss",
    "sparse_per_token_divergence",
]
