"""Several ways to train one student, side by side against its scratch run: KI, grown from the teacher,
grown + KI (``tools/ki_report.py --arm``), as ``arms_report.md`` and ``arms_report.png``.

Each arm is compared with the scratch run by :func:`megatron_ki.training.report.build_ki_report` (the same
numbers as a single KI report): the step, training FLOPs (a teacher's forward counted; growth costs nothing)
and seconds at which the arm first reaches the scratch run's final validation loss, its final gap, and where it
first went below the teacher; and its loss before the first step (``train.eval_at_start``), which is the
teacher's for a student grown from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_ki.fileio import write_text_atomic

from .report import KIReport, Run, _fmt, _new_figure, _save_figure, build_ki_report, read_run_records

MD_FILE, PNG_FILE = "arms_report.md", "arms_report.png"


@dataclass
class ArmsReport:
    """Every arm's :class:`KIReport` against one scratch run, and each run's loss at step 0."""

    scratch: Run
    arms: dict[str, KIReport]
    starts: dict[str, float | None]
    teacher_level: float | None
    teacher_source: str

    def markdown(self) -> str:
        return _markdown(self)


def start_value(run_dir: str | os.PathLike, metric: str = "lm_loss", split: str = "valid") -> float | None:
    """The run's evaluation at step 0 (before its first step), None if it did not evaluate there."""
    _, records = read_run_records(run_dir)
    return next(
        (
            r[metric]
            for r in records
            if r.get("split") == split and r.get("step") == 0 and r.get(metric) is not None
        ),
        None,
    )


def build_arms_report(
    arms: dict[str, str | os.PathLike],
    scratch_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike | None = None,
    metric: str = "lm_loss",
    split: str = "valid",
) -> ArmsReport:
    """Compare each of ``arms`` (label -> run directory) with the scratch run; works on runs still going."""
    reports = {
        label: build_ki_report(d, scratch_dir, teacher_dir, metric, split) for label, d in arms.items()
    }
    for label, r in reports.items():
        r.ki.label = label
    first = next(iter(reports.values()))
    known = [r for r in reports.values() if r.teacher_level is not None]
    level = known[0].teacher_level if known else None
    source = known[0].teacher_source if known else first.teacher_source
    starts = {label: start_value(d, metric, split) for label, d in arms.items()}
    starts["scratch"] = start_value(scratch_dir, metric, split)
    return ArmsReport(first.scratch, reports, starts, level, source)


def _pct(r: KIReport) -> str:
    if r.ki_hit is None or r.scratch_hit is None or not r.scratch_hit.step:
        return "not reached" if r.ki_hit is None else "-"
    return f"{r.ki_hit.step} ({100.0 * r.ki_hit.step / r.scratch_hit.step:.1f}%)"


def _markdown(a: ArmsReport) -> str:
    sc = a.scratch
    target = sc.final_value
    lines = [
        f"# Arms against {sc.path}",
        "",
        f"Target: the scratch run's final {a.scratch.split} {a.scratch.metric}, {target:.4f} (step {sc.steps[-1]}). "
        f"Teacher level: {_fmt(a.teacher_level, '.4f')} ({a.teacher_source}).",
        "",
        "| arm | loss at step 0 | step at target (% of scratch's) | FLOPs saved | time saved | final | final gap vs "
        "scratch | below the teacher from |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in a.arms.items():
        lines.append(
            f"| {label} | {_fmt(a.starts.get(label), '.4f')} | {_pct(r)} | {_fmt(r.saved_flops, '.1f', '%')} "
            f"| {_fmt(r.saved_seconds, '.1f', '%')} | {r.ki.final_value:.4f} | {_fmt(r.final_gap, '+.4f')} "
            f"| {_fmt(r.ki_overtake_step, 'd')} |"
        )
    scratch_overtake = next(iter(a.arms.values())).scratch_overtake_step
    lines.append(
        f"| scratch | {_fmt(a.starts.get('scratch'), '.4f')} | {sc.steps[-1]} | - | - | {target:.4f} | - "
        f"| {_fmt(scratch_overtake, 'd')} |"
    )
    lines += ["", f"![arms]({PNG_FILE})", ""]
    return "\n".join(lines)


def plot_arms_report(a: ArmsReport, out: str | os.PathLike) -> Path:
    """Loss vs step and vs cumulative training FLOPs of every arm and the scratch run; atomic write."""
    fig = _new_figure(12, 4.5)
    axes = fig.subplots(1, 2)
    runs = [*(r.ki for r in a.arms.values()), a.scratch]
    for ax, attr, xlabel in ((axes[0], "steps", "step"), (axes[1], "flops", "cumulative training FLOPs")):
        for run in runs:
            known = [(x, v) for x, v in zip(getattr(run, attr), run.values) if x is not None]
            if known:
                ax.plot([x for x, _ in known], [v for _, v in known], marker=".", label=run.label)
        if a.teacher_level is not None:
            ax.axhline(a.teacher_level, color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.axhline(a.scratch.final_value, color="black", linestyle=":", linewidth=1, label="scratch final")
        ylabel = f"{a.scratch.split} {a.scratch.metric}"
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} vs {xlabel}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save_figure(fig, Path(out))


def write_arms_report(report: ArmsReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write arms_report.md and arms_report.png into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    png = plot_arms_report(report, out_dir / PNG_FILE)
    md = write_text_atomic(out_dir / MD_FILE, report.markdown())
    return md, png
