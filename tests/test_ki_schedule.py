"""a_t schedules: the paper's linear decay, step, constant, warmup-stable-decay, and when the teacher is freed."""

from __future__ import annotations

import pytest

from megatron_ki.config import KIConfig
from megatron_ki.ki import KISchedule, build_schedule


def _cfg(**kw) -> KIConfig:
    kw.setdefault("enabled", True)
    kw.setdefault("teacher_path", "/ckpt/teacher")
    return KIConfig(**kw)


@pytest.mark.parametrize(
    "decay_steps, step, expected",
    [
        # MEDIUM -> BASE, T_ki = 35k (a_0 = 1): halfway at 17.5k, zero from 35k on.
        (35_000, 0, 1.0),
        (35_000, 7_000, 0.8),
        (35_000, 17_500, 0.5),
        (35_000, 34_999, 1.0 / 35_000),
        (35_000, 35_000, 0.0),
        (35_000, 125_000, 0.0),
        # BASE -> LARGE, T_ki = 40k.
        (40_000, 10_000, 0.75),
        (40_000, 30_000, 0.25),
        (40_000, 40_001, 0.0),
    ],
)
def test_linear_decay_paper_values(decay_steps: int, step: int, expected: float) -> None:
    sched = build_schedule(_cfg(schedule="linear", alpha0=1.0, decay_steps=decay_steps))
    assert sched.alpha(step) == pytest.approx(expected, abs=1e-12)


def test_linear_with_smaller_alpha0_and_zero_decay() -> None:
    sched = build_schedule(_cfg(schedule="linear", alpha0=0.5, decay_steps=100))
    assert [sched.alpha(s) for s in (0, 50, 99, 100, 101)] == pytest.approx([0.5, 0.25, 0.005, 0.0, 0.0])
    zero = build_schedule(_cfg(schedule="linear", alpha0=1.0, decay_steps=0))
    assert zero.alpha(0) == 0.0 and not zero.teacher_needed(0)


def test_step_schedule() -> None:
    sched = build_schedule(_cfg(schedule="step", alpha0=1.0, decay_steps=55_000))
    assert sched.alpha(0) == 1.0
    assert sched.alpha(54_999) == 1.0
    assert sched.alpha(55_000) == 0.0
    assert sched.alpha(200_000) == 0.0


def test_constant_schedule() -> None:
    sched = build_schedule(_cfg(schedule="constant", alpha0=0.5, decay_steps=10))
    assert {sched.alpha(s) for s in (0, 10, 10_000, 10**7)} == {0.5}
    assert all(sched.teacher_needed(s) for s in (0, 10, 10**7))
    off = build_schedule(_cfg(schedule="constant", alpha0=0.0))
    assert off.alpha(0) == 0.0 and not off.teacher_needed(0)


def _wsd_lr(
    step: int, peak: float = 5e-4, warmup: int = 100, stable_end: int = 800, total: int = 1000
) -> float:
    if step < warmup:
        return peak * step / warmup
    if step < stable_end:
        return peak
    return peak * max(0.0, (total - step) / (total - stable_end))


def test_wsd_follows_lr() -> None:
    sched = build_schedule(_cfg(schedule="wsd", alpha0=0.9), lr_fn=_wsd_lr, peak_lr=5e-4)
    assert sched.alpha(0) == 0.0
    assert sched.alpha(50) == pytest.approx(0.45)
    assert sched.alpha(100) == pytest.approx(0.9)
    assert sched.alpha(500) == pytest.approx(0.9)
    assert sched.alpha(900) == pytest.approx(0.45)
    assert sched.alpha(1000) == 0.0
    assert sched.teacher_needed(0) and sched.teacher_needed(999)


def test_wsd_requires_lr_function() -> None:
    with pytest.raises(ValueError, match="lr_fn"):
        build_schedule(_cfg(schedule="wsd"))
    with pytest.raises(ValueError, match="peak_lr"):
        build_schedule(_cfg(schedule="wsd"), lr_fn=_wsd_lr)


@pytest.mark.parametrize("kind", ["linear", "step"])
def test_teacher_needed_flips_exactly_at_T(kind: str) -> None:
    T = 40_000
    sched = build_schedule(_cfg(schedule=kind, alpha0=1.0, decay_steps=T))
    assert sched.teacher_needed(0)
    assert sched.teacher_needed(T - 1)
    assert sched.alpha(T - 1) > 0.0
    assert not sched.teacher_needed(T)
    assert sched.alpha(T) == 0.0
    # once released, never needed again and a_t stays 0
    assert not any(sched.teacher_needed(s) for s in range(T, T + 1000, 7))
    assert all(sched.alpha(s) == 0.0 for s in range(T, T + 1000, 7))


def test_teacher_needed_consistent_with_alpha() -> None:
    """Whenever the teacher is declared unneeded, a_t is 0 from there on."""
    for kind in ("linear", "step", "constant"):
        sched = build_schedule(_cfg(schedule=kind, alpha0=0.7, decay_steps=30))
        for s in range(60):
            if not sched.teacher_needed(s):
                assert all(sched.alpha(u) == 0.0 for u in range(s, 80)), (kind, s)


def test_disabled_ki_is_zero() -> None:
    sched = build_schedule(KIConfig(enabled=False, schedule="linear", alpha0=1.0, decay_steps=100))
    assert sched.alpha(0) == 0.0 and not sched.teacher_needed(0)


def test_bad_values_name_the_option() -> None:
    with pytest.raises(ValueError, match="ki.schedule"):
        KISchedule("cosine", 1.0)
    with pytest.raises(ValueError, match=r"ki.alpha0"):
        KISchedule("linear", 1.5, 10)
    with pytest.raises(ValueError, match="step"):
        KISchedule("linear", 1.0, 10).alpha(-1)
