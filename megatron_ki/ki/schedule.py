"""Schedules of the KD weight a_t in ``L = (1 - a_t) L_lm + a_t tau^2 KL``.

The paper's default is a linear decay to 0 over T_ki steps, after which training is pure self-learning and
the teacher can be released; :meth:`KISchedule.teacher_needed` tells the training loop when that happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_ki.config import KIConfig

SCHEDULES: tuple[str, ...] = ("linear", "step", "constant", "wsd")


@dataclass(frozen=True)
class KISchedule:
    """a_t as a function of the optimizer step (0-based: step t is the t-th update)."""

    kind: str
    """One of linear, step, constant, wsd."""
    alpha0: float
    """a_0, the weight at step 0 (for wsd: at the LR peak)."""
    decay_steps: int = 0
    """T_ki for linear and step."""
    lr_fn: Callable[[int], float] | None = None
    """wsd only: the learning rate at a step."""
    peak_lr: float | None = None
    """wsd only: the peak learning rate, so a_t = a_0 * lr_t / peak_lr."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"ki.schedule: expected one of {SCHEDULES}, got {self.kind!r}")
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError(f"ki.alpha0: must be in [0, 1], got {self.alpha0}")
        if self.decay_steps < 0:
            raise ValueError(f"ki.decay_steps: must be >= 0, got {self.decay_steps}")
        if self.kind == "wsd" and (self.lr_fn is None or self.peak_lr is None or self.peak_lr <= 0):
            raise ValueError(
                "ki.schedule 'wsd' follows the learning rate: build_schedule needs lr_fn (step -> lr) and a "
                f"positive peak_lr (optim.lr), got lr_fn={self.lr_fn!r}, peak_lr={self.peak_lr!r}"
            )

    def alpha(self, step: int) -> float:
        """The KD weight a_t at optimizer step ``step`` (>= 0), in [0, alpha0]."""
        if step < 0:
            raise ValueError(f"KISchedule.alpha: step must be >= 0, got {step}")
        if self.alpha0 == 0.0:
            return 0.0
        if self.kind == "linear":
            if step >= self.decay_steps:
                return 0.0
            return max(self.alpha0 * (1.0 - step / self.decay_steps), 0.0)
        if self.kind == "step":
            return self.alpha0 if step < self.decay_steps else 0.0
        if self.kind == "constant":
            return self.alpha0
        lr = float(self.lr_fn(step))  # type: ignore[misc]  # wsd, checked in __post_init__
        return min(max(self.alpha0 * lr / self.peak_lr, 0.0), self.alpha0)  # type: ignore[operator]

    def teacher_needed(self, step: int) -> bool:
        """False once a_t is 0 at ``step`` and every later step, so the teacher can be skipped and freed.

        Linear and step: exactly from step T_ki on. Constant: never needed if a_0 = 0. WSD: the LR function is
        opaque (it may start at 0 in warmup), so the teacher is kept whenever a_0 > 0.
        """
        if self.alpha0 == 0.0:
            return False
        if self.kind in ("linear", "step"):
            return step < self.decay_steps
        return True

    def __call__(self, step: int) -> float:
        return self.alpha(step)


def build_schedule(
    ki_config: KIConfig, lr_fn: Callable[[int], float] | None = None, peak_lr: float | None = None
) -> KISchedule:
    """The schedule described by ``ki_config`` (ki.schedule, ki.alpha0, ki.decay_steps).

    ``lr_fn`` and ``peak_lr`` (optim.lr) are needed for ``wsd``. With ``ki.enabled`` false a_t is 0 always.
    """
    if not ki_config.enabled:
        return KISchedule("constant", 0.0)
    return KISchedule(ki_config.schedule, ki_config.alpha0, ki_config.decay_steps, lr_fn, peak_lr)
