"""Read runs' metrics.jsonl and compare them: the compute a run needs to reach a target loss
(tools/plot_runs.py) and the KI report, KI against a scratch run of the same student (tools/ki_report.py).

Cumulative training FLOPs of a point come from a ``flops`` (or ``train_flops``) field in its record or in the
train records around its step; else from ``consumed_tokens`` (or ``tokens``) x ``flops_per_token``, summed step
by step. Its training seconds come from its own ``train_time_s``, else from the train records' ``train_time_s``
around its step, else from their ``step_time_s`` summed (a logged step time stands for the steps since the
previous train record). A train record whose step is not larger than an earlier one marks a restart from a
checkpoint: the first attempt's records from that step on are dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_ki.errors import MegatronKIError
from megatron_ki.fileio import atomic_save, write_text_atomic
from megatron_ki.training.metrics import METRICS_FILE, read_metrics

FLOPS_KEYS = ("flops", "train_flops")
TOKENS_KEYS = ("consumed_tokens", "tokens")
SECONDS_KEYS = ("train_time_s",)
WARMUP_STEPS = 3
"""Steps whose times the KI overhead skips: allocation, compilation and autotuning slow them down."""
MARKDOWN_FILE = "ki_report.md"
PNG_FILE = "ki_report.png"


class PlotRunsError(MegatronKIError):
    """A run directory or its metrics cannot be used; the message names the path."""


@dataclass
class Run:
    """One metric of one run: evaluation points in step order, with cumulative training FLOPs and seconds
    where known."""

    label: str
    path: Path
    metric: str
    split: str
    steps: list[int]
    values: list[float]
    flops: list[float | None]
    seconds: list[float | None]

    @property
    def final_value(self) -> float:
        return self.values[-1]

    @property
    def has_flops(self) -> bool:
        return any(f is not None for f in self.flops)

    @property
    def has_seconds(self) -> bool:
        return any(s is not None for s in self.seconds)


@dataclass
class TargetHit:
    """Where a run first reaches the target."""

    step: int
    flops: float | None
    seconds: float | None = None


def _split_of(record: dict[str, Any]) -> str:
    return str(record.get("split") or "train")


def _number(record: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _latest_attempt(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop records superseded by a restart (a train step that does not increase)."""
    out: list[dict[str, Any]] = []
    last_train: int | None = None
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if _split_of(record) == "train":
            if last_train is not None and step <= last_train:
                out = [r for r in out if r["step"] < step]
            last_train = step
        out.append(record)
    return out


def _flops_timeline(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, cumulative training FLOPs) known from the records, step-sorted, starting at (0, 0)."""
    direct = [(r["step"], v) for r in records if (v := _number(r, FLOPS_KEYS)) is not None]
    if direct:
        points = dict([(0, 0.0), *direct])
        return sorted(points.items())
    timeline = [(0, 0.0)]
    prev_tokens, total = 0.0, 0.0
    for r in records:
        if _split_of(r) != "train":
            continue
        tokens, per_token = _number(r, TOKENS_KEYS), _number(r, ("flops_per_token",))
        if tokens is None or per_token is None:
            continue
        total += max(tokens - prev_tokens, 0.0) * per_token
        prev_tokens = tokens
        timeline.append((r["step"], total))
    return sorted(dict(timeline).items()) if len(timeline) > 1 else []


def _seconds_timeline(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, cumulative training seconds) from the train records, step-sorted, starting at (0, 0).

    Older logs have no ``train_time_s``: their ``step_time_s`` are summed, each weighted by the steps since
    the previous train record, so a log written every N steps is not undercounted N times.
    """
    train = [r for r in records if _split_of(r) == "train"]
    direct = [(r["step"], v) for r in train if (v := _number(r, SECONDS_KEYS)) is not None]
    if direct:
        return sorted(dict([(0, 0.0), *direct]).items())
    timeline, prev_step, total = [(0, 0.0)], 0, 0.0
    for r in train:
        step_time = _number(r, ("step_time_s",))
        if step_time is None:
            continue
        total += step_time * max(r["step"] - prev_step, 1)
        prev_step = r["step"]
        timeline.append((r["step"], total))
    return sorted(dict(timeline).items()) if len(timeline) > 1 else []


def _interpolate(timeline: list[tuple[int, float]], step: int) -> float | None:
    if not timeline or step > timeline[-1][0]:
        return None
    for (s0, f0), (s1, f1) in itertools.pairwise(timeline):
        if s0 <= step <= s1:
            return f0 if s1 == s0 else f0 + (f1 - f0) * (step - s0) / (s1 - s0)
    return timeline[0][1] if step == timeline[0][0] else None


def read_run_records(run_dir: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    """(metrics file, its records of the latest attempt) of a run directory or a metrics file given directly."""
    path = Path(run_dir)
    if not path.exists():
        raise PlotRunsError(f"run directory not found: {path}")
    metrics_path = path if path.is_file() else path / METRICS_FILE
    if not metrics_path.is_file():
        raise PlotRunsError(f"{metrics_path} not found (is {path} a run directory?)")
    try:
        return metrics_path, _latest_attempt(read_metrics(metrics_path))
    except (OSError, ValueError) as e:
        raise PlotRunsError(f"cannot read {metrics_path}: {e}") from None


def run_from_records(
    path: Path,
    metrics_path: Path,
    records: list[dict[str, Any]],
    metric: str = "lm_loss",
    split: str = "valid",
    label: str | None = None,
) -> Run:
    """One metric of one split of already read records (see :func:`read_run_records`) as a :class:`Run`."""
    points: dict[int, float] = {}
    own_flops: dict[int, float] = {}
    own_seconds: dict[int, float] = {}
    for r in records:
        if _split_of(r) != split:
            continue
        value = _number(r, (metric,))
        if value is None:
            continue
        points[r["step"]] = value  # a later record for the same step wins
        if (f := _number(r, FLOPS_KEYS)) is not None:
            own_flops[r["step"]] = f
        if (t := _number(r, SECONDS_KEYS)) is not None:
            own_seconds[r["step"]] = t
    if not points:
        splits = sorted({_split_of(r) for r in records})
        keys = sorted({k for r in records if _split_of(r) == split for k in r} - {"step", "split"})
        raise PlotRunsError(
            f"{metrics_path} has no '{split}' records with a numeric '{metric}' "
            f"(splits present: {splits}; keys of '{split}' records: {keys})"
        )
    flops_line, seconds_line = _flops_timeline(records), _seconds_timeline(records)
    steps = sorted(points)
    flops = [own_flops[s] if s in own_flops else _interpolate(flops_line, s) for s in steps]
    seconds = [own_seconds[s] if s in own_seconds else _interpolate(seconds_line, s) for s in steps]
    name = label or (path.parent.name if path.is_file() else path.resolve().name)
    return Run(name, path, metric, split, steps, [points[s] for s in steps], flops, seconds)


def load_run(
    run_dir: str | os.PathLike, metric: str = "lm_loss", split: str = "valid", label: str | None = None
) -> Run:
    """Read ``run_dir/metrics.jsonl`` (or a metrics file given directly) into a :class:`Run`."""
    metrics_path, records = read_run_records(run_dir)
    return run_from_records(Path(run_dir), metrics_path, records, metric, split, label)


def steps_to_target(run: Run, target: float, higher_is_better: bool = False) -> TargetHit | None:
    """First evaluation point at which ``run`` reaches ``target`` (<= for losses), or None if it never does.

    No interpolation between evaluations: the answer is an evaluated step, as in the paper's comparison.
    """
    for step, value, flops, seconds in zip(run.steps, run.values, run.flops, run.seconds):
        if (value >= target) if higher_is_better else (value <= target):
            return TargetHit(step, flops, seconds)
    return None


def compute_saved(reference: float | None, cost: float | None) -> float | None:
    """Compute saved relative to the reference, in percent: (reference - cost) / reference x 100."""
    if reference is None or cost is None or reference <= 0:
        return None
    return (reference - cost) / reference * 100.0


def reference_index(runs: list[Run]) -> int:
    """The run labelled "scratch" if any, else the last one."""
    for i, run in enumerate(runs):
        if run.label == "scratch":
            return i
    return len(runs) - 1


def summarize(
    runs: list[Run], target: float | None = None, higher_is_better: bool = False
) -> tuple[float, int, list[dict[str, Any]]]:
    """(target, reference index, one row per run with its hit and the compute saved in steps and FLOPs)."""
    ref = reference_index(runs)
    if target is None:
        target = runs[ref].final_value
    hits = [steps_to_target(r, target, higher_is_better) for r in runs]
    ref_hit = hits[ref]
    rows = []
    for run, hit in zip(runs, hits):
        rows.append(
            {
                "label": run.label,
                "final": run.final_value,
                "step": hit.step if hit else None,
                "flops": hit.flops if hit else None,
                "saved_steps": compute_saved(ref_hit.step, hit.step) if hit and ref_hit else None,
                "saved_flops": compute_saved(ref_hit.flops, hit.flops) if hit and ref_hit else None,
            }
        )
    return target, ref, rows


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(runs: list[Run], target: float, ref: int, rows: list[dict[str, Any]]) -> str:
    metric = f"{runs[0].split} {runs[0].metric}"
    lines = [f"target {metric} = {target:.4f} (reference run: {runs[ref].label})"]
    header = ("run", "final", "step@target", "FLOPs@target", "saved steps", "saved FLOPs")
    table = [header] + [
        (
            r["label"],
            f"{r['final']:.4f}",
            _fmt(r["step"], "d") if r["step"] is not None else "not reached",
            _fmt(r["flops"], ".3e"),
            _fmt(r["saved_steps"], ".1f", "%"),
            _fmt(r["saved_flops"], ".1f", "%"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
    return "\n".join(lines)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, out: Path) -> Path:
    """Write ``fig`` to ``out`` atomically (a temporary name, then a rename: a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=120))


def plot(runs: list[Run], out: str | os.PathLike, target: float | None = None) -> Path:
    """Draw loss vs step and loss vs cumulative training FLOPs; write ``out`` atomically (temp, rename)."""
    out = Path(out)
    fig = _new_figure(12, 4.5)
    ax_steps, ax_flops = fig.subplots(1, 2)
    ylabel = f"{runs[0].split} {runs[0].metric}"
    for run in runs:
        ax_steps.plot(run.steps, run.values, marker=".", label=run.label)
        known = [(f, v) for f, v in zip(run.flops, run.values) if f is not None]
        if known:
            ax_flops.plot([f for f, _ in known], [v for _, v in known], marker=".", label=run.label)
    ax_steps.set(xlabel="step", ylabel=ylabel, title=f"{ylabel} vs step")
    ax_flops.set(xlabel="cumulative training FLOPs", ylabel=ylabel, title=f"{ylabel} vs training FLOPs")
    missing = [r.label for r in runs if not r.has_flops]
    any_flops = len(missing) < len(runs)
    if target is not None:
        for ax in (ax_steps, ax_flops) if any_flops else (ax_steps,):
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    ax_steps.legend()
    if not any_flops:
        _unavailable(
            ax_flops,
            "cumulative FLOPs unavailable:\nno 'flops'/'train_flops' or\n'consumed_tokens' x 'flops_per_token'\n"
            "fields in metrics.jsonl",
        )
    else:
        if missing:
            ax_flops.text(
                0.02, 0.02, f"no FLOPs for: {', '.join(missing)}", transform=ax_flops.transAxes, fontsize=8
            )
        ax_flops.legend()
    for ax in (ax_steps, ax_flops) if any_flops else (ax_steps,):
        ax.grid(True, alpha=0.3)
    return _save_figure(fig, out)


def _unavailable(ax, text: str) -> None:
    """Say in the panel why it is empty instead of drawing misleading axes."""
    ax.set(xticks=[], yticks=[])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


# ------------------------------------------------------------------------------------------ the KI report
@dataclass
class Progress:
    """How far a run got: its last logged step and, from its config.yaml, the planned train_steps."""

    label: str
    last_step: int | None
    planned_steps: int | None

    @property
    def finished(self) -> bool | None:
        """None when the planned length is unknown (no config.yaml)."""
        if self.last_step is None or self.planned_steps is None:
            return None
        return self.last_step >= self.planned_steps

    def describe(self) -> str:
        planned = f"{self.planned_steps}" if self.planned_steps is not None else "? (no config.yaml)"
        return f"{self.label} at step {self.last_step} of {planned}"


@dataclass
class Overhead:
    """KI's per-step cost while the teacher ran, against scratch over the same steps (medians)."""

    first_step: int
    last_step: int
    n_steps: int
    ki_step_time_s: float
    scratch_step_time_s: float
    overhead_pct: float
    ki_flops_per_token: float | None
    scratch_flops_per_token: float | None
    flop_share_pct: float | None
    difference_points: float | None


@dataclass
class KIReport:
    """What a KI run saved against a scratch run of the same student, and what the teacher cost per step."""

    metric: str
    split: str
    ki: Run
    scratch: Run
    teacher: Run | None
    target: float
    target_step: int
    ki_hit: TargetHit | None
    scratch_hit: TargetHit | None
    saved_steps: float | None
    saved_flops: float | None
    saved_seconds: float | None
    gap_step: int | None
    final_gap: float | None
    teacher_level: float | None
    teacher_source: str
    ki_overtake_step: int | None
    scratch_overtake_step: int | None
    overhead: Overhead | None
    ki_progress: Progress
    scratch_progress: Progress
    ki_alpha: list[tuple[int, float]] = field(default_factory=list)
    ki_kd_loss: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def unfinished(self) -> list[Progress]:
        return [p for p in (self.ki_progress, self.scratch_progress) if p.finished is False]

    @property
    def provisional(self) -> bool:
        return bool(self.unfinished)

    def verdict(self) -> str:
        return _verdict(self)

    def markdown(self) -> str:
        return _markdown(self)


def _planned_steps(run_path: Path) -> int | None:
    """train.train_steps of the run's resolved config.yaml, None if it is missing or unreadable."""
    config = (run_path.parent if run_path.is_file() else run_path) / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    train = data.get("train") if isinstance(data, dict) else None
    steps = train.get("train_steps") if isinstance(train, dict) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _load(
    run_dir: str | os.PathLike, label: str, metric: str, split: str
) -> tuple[Run, list[dict[str, Any]], Progress]:
    path = Path(run_dir)
    metrics_path, records = read_run_records(path)
    run = run_from_records(path, metrics_path, records, metric, split, label)
    last = max((r["step"] for r in records), default=None)
    return run, records, Progress(label, last, _planned_steps(path))


def _train(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if _split_of(r) == "train"]


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], v) for r in _train(records) if (v := _number(r, (key,))) is not None]


def _first_below(run: Run, level: float | None) -> int | None:
    """First evaluated step strictly below ``level`` (the student overtook the teacher), None if not yet. An
    evaluation before the first step (``train.eval_at_start``) is where a run starts, not an overtaking: a
    student grown from the teacher starts at its level, a rounding error either side."""
    if level is None:
        return None
    return next((s for s, v in zip(run.steps, run.values) if s > 0 and v < level), None)


def _teacher_level(
    ki: Run, ki_records: list[dict[str, Any]], teacher_dir: str | os.PathLike | None, notes: list[str]
) -> tuple[float | None, str, Run | None]:
    """The teacher's loss on the validation tokens: the KI run's own teacher_lm_loss, else the teacher run's."""
    teacher = None
    if teacher_dir is not None:
        try:
            teacher = _load(teacher_dir, "teacher", ki.metric, ki.split)[0]
        except PlotRunsError as e:
            notes.append(f"teacher run not used: {e}")
    split = _split_word(ki.split)
    own = None
    if ki.metric == "lm_loss":  # teacher_lm_loss is comparable with lm_loss only
        with contextlib.suppress(PlotRunsError):
            own = run_from_records(ki.path, ki.path, ki_records, "teacher_lm_loss", ki.split, "teacher")
    if own is not None:
        source = f"the KI run's {split} teacher_lm_loss (same tokens), latest at step {own.steps[-1]}"
        return own.final_value, source, teacher
    if teacher is not None:
        source = f"the teacher run's final {split} {ki.metric} (step {teacher.steps[-1]}, {teacher.path})"
        return teacher.final_value, source, teacher
    return None, f"none: the KI run logged no {split} teacher_lm_loss and no teacher run was read", None


def _paired(
    ki: dict[int, dict[str, Any]], scratch: dict[int, dict[str, Any]], key: str
) -> list[tuple[int, float, float]]:
    """(step, KI value, scratch value) of ``key`` at the steps both runs logged it."""
    out = []
    for step in sorted(set(ki) & set(scratch)):
        a, b = _number(ki[step], (key,)), _number(scratch[step], (key,))
        if a is not None and b is not None:
            out.append((step, a, b))
    return out


def _overhead(
    ki_records: list[dict[str, Any]], scratch_records: list[dict[str, Any]], notes: list[str]
) -> Overhead | None:
    """Median step time and FLOPs per token of KI while the teacher ran, against scratch on the same steps."""
    with_teacher = [r for r in _train(ki_records) if r.get("kd_loss") is not None]
    ki = {r["step"]: r for r in with_teacher if r["step"] > WARMUP_STEPS}
    scratch = {r["step"]: r for r in _train(scratch_records)}
    times = [t for t in _paired(ki, scratch, "step_time_s") if t[2] > 0]
    if not times:
        notes.append(
            f"KI overhead not measured: no step_time_s logged by both runs at steps after {WARMUP_STEPS} where "
            "the teacher ran (KI train records with kd_loss)"
        )
        return None
    ki_time = statistics.median(t[1] for t in times)
    scratch_time = statistics.median(t[2] for t in times)
    overhead = (ki_time / scratch_time - 1) * 100
    ki_fpt = scratch_fpt = share = None
    if per_token := _paired(ki, scratch, "flops_per_token"):
        ki_fpt = statistics.median(f[1] for f in per_token)
        scratch_fpt = statistics.median(f[2] for f in per_token)
        share = (ki_fpt / scratch_fpt - 1) * 100 if scratch_fpt > 0 else None
    difference = overhead - share if share is not None else None
    return Overhead(
        first_step=times[0][0],
        last_step=times[-1][0],
        n_steps=len(times),
        ki_step_time_s=ki_time,
        scratch_step_time_s=scratch_time,
        overhead_pct=overhead,
        ki_flops_per_token=ki_fpt,
        scratch_flops_per_token=scratch_fpt,
        flop_share_pct=share,
        difference_points=difference,
    )


def _seconds_note(run: Run, records: list[dict[str, Any]]) -> str | None:
    """Say when training seconds are an estimate (older logs without train_time_s)."""
    train = _train(records)
    if not run.has_seconds or any(_number(r, SECONDS_KEYS) is not None for r in train):
        return None
    return f"{run.label}'s training seconds are summed from its logged step_time_s (no train_time_s logged)"


def _saved(reference: TargetHit | None, hit: TargetHit | None, attr: str) -> float | None:
    if reference is None or hit is None:
        return None
    return compute_saved(getattr(reference, attr), getattr(hit, attr))


def _final_gap(ki: Run, scratch: Run) -> tuple[int | None, float | None]:
    """KI minus scratch at the last step both evaluated."""
    both = sorted(set(ki.steps) & set(scratch.steps))
    if not both:
        return None, None
    step = both[-1]
    return step, ki.values[ki.steps.index(step)] - scratch.values[scratch.steps.index(step)]


def build_ki_report(
    ki_dir: str | os.PathLike,
    scratch_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike | None = None,
    metric: str = "lm_loss",
    split: str = "valid",
) -> KIReport:
    """Compare a KI run with a scratch run of the same student; works on runs still going.

    Raises PlotRunsError (naming the path) when the KI or scratch run cannot be read; a teacher run that
    cannot be read is only noted, the KI run's own teacher_lm_loss being the better teacher level anyway.
    """
    ki, ki_records, ki_progress = _load(ki_dir, "KI", metric, split)
    scratch, scratch_records, scratch_progress = _load(scratch_dir, "scratch", metric, split)
    notes: list[str] = []
    target = scratch.final_value
    ki_hit, scratch_hit = steps_to_target(ki, target), steps_to_target(scratch, target)
    gap_step, gap = _final_gap(ki, scratch)
    level, source, teacher = _teacher_level(ki, ki_records, teacher_dir, notes)
    overhead = _overhead(ki_records, scratch_records, notes)
    notes += [n for n in (_seconds_note(ki, ki_records), _seconds_note(scratch, scratch_records)) if n]
    return KIReport(
        metric=metric,
        split=split,
        ki=ki,
        scratch=scratch,
        teacher=teacher,
        target=target,
        target_step=scratch.steps[-1],
        ki_hit=ki_hit,
        scratch_hit=scratch_hit,
        saved_steps=_saved(scratch_hit, ki_hit, "step"),
        saved_flops=_saved(scratch_hit, ki_hit, "flops"),
        saved_seconds=_saved(scratch_hit, ki_hit, "seconds"),
        gap_step=gap_step,
        final_gap=gap,
        teacher_level=level,
        teacher_source=source,
        ki_overtake_step=_first_below(ki, level),
        scratch_overtake_step=_first_below(scratch, level),
        overhead=overhead,
        ki_progress=ki_progress,
        scratch_progress=scratch_progress,
        ki_alpha=_series(ki_records, "alpha"),
        ki_kd_loss=_series(ki_records, "kd_loss"),
        notes=notes,
    )


def _split_word(split: str) -> str:
    return {"valid": "validation"}.get(split, split)


def _change(saved: float | None, noun: str, fewer: str = "fewer", suffix: str = "") -> str:
    """'40.0% fewer steps' / '12.5% more FLOPs' / 'FLOPs not measured'."""
    if saved is None:
        return f"{noun} not measured"
    return f"{abs(saved):.1f}% {fewer if saved >= 0 else 'more'} {noun}{suffix}"


def _verdict(r: KIReport) -> str:
    """Plain-language conclusion that claims no more than the numbers measured."""
    final = "latest" if r.scratch_progress.finished is False else "final"
    what = f"the scratch run's {final} {_split_word(r.split)} {r.metric} ({r.target:.4f})"
    if r.ki_hit is None or r.scratch_hit is None:
        best = min(r.ki.values)
        text = (
            f"No saving measured: KI has not reached {what}; "
            f"its best is {best:.4f} at step {r.ki.steps[r.ki.values.index(best)]}, "
            f"last evaluated at step {r.ki.steps[-1]}."
        )
    else:
        changes = ", ".join(
            (
                _change(r.saved_steps, "steps"),
                _change(r.saved_flops, "FLOPs", suffix=" (teacher forward included)"),
                _change(r.saved_seconds, "training time", fewer="less"),
            )
        )
        head = "KI costs more: it reached" if r.ki_hit.step > r.scratch_hit.step else "KI reached"
        text = f"{head} {what} at step {r.ki_hit.step}, scratch at step {r.scratch_hit.step}: {changes}."
    if r.teacher_level is not None:
        when = {None: "not within the run"}
        ki_when = when.get(r.ki_overtake_step, f"at step {r.ki_overtake_step}")
        scratch_when = when.get(r.scratch_overtake_step, f"at step {r.scratch_overtake_step}")
        text += (
            f" The KI student went below its teacher's {r.metric} ({r.teacher_level:.4f}) {ki_when}; "
            f"the scratch student {scratch_when}."
        )
    if r.provisional:
        going = "; ".join(p.describe() for p in r.unfinished)
        text += f" Provisional: in progress ({going}), so these numbers will change."
    return text + " This is a single-seed comparison: the seed-to-seed spread is not measured by this report."


def _status(p: Progress) -> str:
    if p.finished is None:
        return "unknown (no train_steps in config.yaml)"
    return "finished" if p.finished else "in progress"


def _runs_section(r: KIReport) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | directory | last logged step | planned steps | status |",
        "|---|---|---:|---:|---|",
    ]
    for run, p in ((r.ki, r.ki_progress), (r.scratch, r.scratch_progress)):
        last, planned = _fmt(p.last_step, "d"), _fmt(p.planned_steps, "d")
        lines.append(f"| {p.label} | {run.path} | {last} | {planned} | {_status(p)} |")
    if r.teacher is not None:
        lines.append(f"| teacher | {r.teacher.path} | {r.teacher.steps[-1]} | - | (read for its level) |")
    if r.provisional:
        lines += ["", "in progress: " + "; ".join(p.describe() for p in r.unfinished) + "."]
    return [*lines, ""]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} s"


def _target_section(r: KIReport) -> list[str]:
    ki, sc = r.ki_hit, r.scratch_hit
    rows = (
        ("step", _fmt(ki and ki.step, "d"), _fmt(sc and sc.step, "d"), r.saved_steps),
        (
            "training FLOPs (teacher forward included)",
            _fmt(ki and ki.flops, ".3e"),
            _fmt(sc and sc.flops, ".3e"),
            r.saved_flops,
        ),
        ("training time", _seconds(ki and ki.seconds), _seconds(sc and sc.seconds), r.saved_seconds),
    )
    lines = [
        "## Compute to reach the target",
        "",
        f"Target: the scratch run's latest {_split_word(r.split)} {r.metric}, {r.target:.4f} (step {r.target_step}). "
        "Each run's first evaluation at or below it (no interpolation between evaluations):",
        "",
        "| | KI | scratch | saved by KI |",
        "|---|---:|---:|---:|",
    ]
    for name, a, b, saved in rows:
        lines.append(f"| {name} | {a if ki else 'not reached'} | {b} | {_fmt(saved, '.1f', '%')} |")
    if r.gap_step is None:
        lines += ["", "Final gap: the runs have no evaluated step in common."]
    else:
        ki_value, scratch_value = (run.values[run.steps.index(r.gap_step)] for run in (r.ki, r.scratch))
        lines += [
            "",
            f"Final gap at step {r.gap_step} (the last step both evaluated): KI - scratch = {r.final_gap:+.4f} "
            f"(KI {ki_value:.4f}, scratch {scratch_value:.4f}).",
        ]
    return [*lines, ""]


def _when(step: int | None) -> str:
    return "not yet" if step is None else f"at step {step}"


def _teacher_section(r: KIReport) -> list[str]:
    lines = ["## Teacher", ""]
    if r.teacher_level is None:
        return [*lines, f"Teacher level unknown ({r.teacher_source}).", ""]
    return [
        *lines,
        f"Teacher level: {r.teacher_level:.4f}, from {r.teacher_source}.",
        "",
        f"First evaluation below it: KI {_when(r.ki_overtake_step)}; scratch {_when(r.scratch_overtake_step)}.",
        "",
    ]


def _overhead_section(r: KIReport) -> list[str]:
    o = r.overhead
    lines = ["## KI overhead per step while the teacher ran", ""]
    if o is None:
        return [*lines, "Not measured (see the notes).", ""]
    lines += [
        f"Steps {o.first_step}-{o.last_step} ({o.n_steps} steps logged by both runs; steps 1-{WARMUP_STEPS} are "
        "warm-up and skipped), medians:",
        "",
        "| | KI | scratch | KI / scratch - 1 |",
        "|---|---:|---:|---:|",
        f"| step time | {o.ki_step_time_s:.4f} s | {o.scratch_step_time_s:.4f} s | {o.overhead_pct:+.1f}% |",
        f"| training FLOPs per token | {_fmt(o.ki_flops_per_token, '.3e')} "
        f"| {_fmt(o.scratch_flops_per_token, '.3e')} | {_fmt(o.flop_share_pct, '+.1f', '%')} |",
        "",
    ]
    text = "Step times compare like with like only if both runs ran on the same hardware under the same load."
    if o.difference_points is not None:
        side = "above" if o.difference_points >= 0 else "below"
        text = f"The step-time overhead is {abs(o.difference_points):.1f} points {side} the teacher's FLOP share. {text}"
    return [*lines, text, ""]


def _markdown(r: KIReport) -> str:
    lines = [
        f"# KI report: {r.ki.path} vs {r.scratch.path}",
        "",
        f"**Verdict.** {r.verdict()}",
        "",
        *_runs_section(r),
        *_target_section(r),
        *_teacher_section(r),
        *_overhead_section(r),
    ]
    if r.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in r.notes), ""]
    return "\n".join([*lines, "## Curves", "", f"![KI report curves]({PNG_FILE})", ""])


def _loss_panel(ax, r: KIReport, attr: str, xlabel: str, unavailable: str) -> None:
    """The metric of KI and scratch against ``attr`` (steps, flops or seconds), teacher dashed, target dotted."""
    ylabel = f"{r.split} {r.metric}"
    missing = []
    for run in (r.ki, r.scratch):
        known = [(x, v) for x, v in zip(getattr(run, attr), run.values) if x is not None]
        if known:
            ax.plot([x for x, _ in known], [v for _, v in known], marker=".", label=run.label)
        else:
            missing.append(run.label)
    if len(missing) == 2:
        _unavailable(ax, unavailable)
        return
    if r.teacher_level is not None:
        ax.axhline(
            r.teacher_level,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"teacher level {r.teacher_level:.4f}",
        )
    ax.axhline(r.target, color="black", linestyle=":", linewidth=1, label=f"target {r.target:.4f}")
    if missing:
        ax.text(0.02, 0.02, f"no {xlabel} for: {', '.join(missing)}", transform=ax.transAxes, fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} vs {xlabel}")
    ax.grid(True, alpha=0.3)
    ax.legend()


def _kd_panel(ax, r: KIReport) -> None:
    """a_t (left axis) and the KD loss (right axis) of the KI run's train records."""
    if not r.ki_alpha and not r.ki_kd_loss:
        _unavailable(ax, "a_t and KD loss unavailable:\nno 'alpha'/'kd_loss' in the\nKI run's train records")
        return
    handles = []
    if r.ki_alpha:
        handles += ax.plot(*zip(*r.ki_alpha), color="tab:blue", label="a_t (alpha)")
    ax.set(xlabel="step", ylabel="a_t", title="KI: a_t and KD loss (train)")
    if r.ki_kd_loss:
        twin = ax.twinx()
        handles += twin.plot(*zip(*r.ki_kd_loss), color="tab:red", linewidth=1, label="KD loss")
        twin.set(ylabel="KD loss")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="upper right")


def plot_ki_report(r: KIReport, out: str | os.PathLike) -> Path:
    """Loss vs step, vs cumulative FLOPs and vs training seconds, and a_t with the KD loss; atomic write."""
    fig = _new_figure(12, 9)
    (ax_steps, ax_flops), (ax_seconds, ax_kd) = fig.subplots(2, 2)
    _loss_panel(ax_steps, r, "steps", "step", "no evaluations")
    _loss_panel(
        ax_flops,
        r,
        "flops",
        "cumulative training FLOPs",
        "cumulative FLOPs unavailable:\nno 'flops' or 'consumed_tokens' x\n'flops_per_token' fields in metrics.jsonl",
    )
    _loss_panel(
        ax_seconds,
        r,
        "seconds",
        "training seconds",
        "training seconds unavailable:\nno 'train_time_s' or 'step_time_s'\nfields in metrics.jsonl",
    )
    _kd_panel(ax_kd, r)
    return _save_figure(fig, Path(out))


def write_ki_report(report: KIReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ki_report.md and ki_report.png into ``out_dir``, each atomically (temp name, then rename)."""
    out_dir = Path(out_dir)
    png = plot_ki_report(report, out_dir / PNG_FILE)
    text = report.markdown()
    md = write_text_atomic(out_dir / MARKDOWN_FILE, text)
    return md, png
