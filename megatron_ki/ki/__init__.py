"""Knowledge Inheritance: the vocab-parallel KD loss and the schedule of its weight a_t."""

from .loss import (
    DIVERGENCES,
    KILossOutput,
    ki_loss,
    kl_backward,
    kl_forward_stats,
    loss_positions,
    merge_stats,
    per_token_divergence,
)
from .schedule import SCHEDULES, KISchedule, build_schedule

__all__ = [
    "DIVERGENCES",
    "SCHEDULES",
    "KILossOutput",
    "KISchedule",
    "build_schedule",
    "ki_loss",
    "kl_backward",
    "kl_forward_stats",
    "loss_positions",
    "merge_stats",
    "per_token_divergence",
]
