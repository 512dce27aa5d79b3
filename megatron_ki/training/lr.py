"""Learning-rate schedule: linear warmup to the peak, then decay to ``min_lr``.

The KI paper's schedule is 10% warmup then linear decay (``OptimConfig`` defaults). The function is pure
(step -> lr), so resumption needs nothing but the step, and the KI ``wsd`` schedule can follow it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from megatron_ki.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    peak, floor = optim.lr, optim.min_lr
    warmup = round(optim.lr_warmup_fraction * total_steps)
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if optim.lr_decay_style == "constant":
        return peak
    if optim.lr_decay_style == "inverse_sqrt":
        return max(floor, peak * math.sqrt(max(warmup, 1)) / math.sqrt(max(step + 1, 1)))
    decay_steps = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    if optim.lr_decay_style == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    if optim.lr_decay_style == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.lr_decay_style: unknown style {optim.lr_decay_style!r}")


def lr_schedule(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """``step -> lr`` bound to a config, for the optimizer and the KI ``wsd`` schedule."""
    return lambda step: lr_at(step, optim, total_steps)
