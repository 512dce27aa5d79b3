"""Knowledge Inheritance: the vocab-parallel KD loss and the schedule of its weight a_t."""

from .loss import (
    DIVERGENCES,
    KILossOutput,
    all_reduce_kl_stats,
    ki_loss,
    loss_positions,
    per_token_divergence,
)
from .schedule import SCHEDULES, KISchedule, build_schedule

__all__ = [
    "DIVERGENCES",
    "SCHEDULES",
    "KILossOutput",
    "KISchedule",
    "all_reduce_kl_stats",
    "build_schedule",
    "ki_loss",
    "loss_positions",
    "per_token_divergence",
]
