#!/usr/bin/env python
"""Plot loss curves of several runs against steps and training FLOPs, and report the compute KI saved.

Example::

    python tools/plot_runs.py runs/scratch runs/ki --labels scratch ki --out curves.png

Each RUN_DIR holds the metrics.jsonl that megatron_ki.training.metrics.MetricsWriter writes. The table gives,
for each run, the first evaluation at which ``--metric`` on ``--split`` reaches the target (default: the final
value of the run labelled "scratch", else of the last run) and the compute saved relative to that reference
run, (ref - run) / ref, in steps and in FLOPs: the paper's "KI reaches at 40k what scratch reaches at 55k".

Cumulative training FLOPs of a point come from a ``flops`` (or ``train_flops``) field in its record or in the
train records around its step; else from ``consumed_tokens`` (or ``tokens``) x ``flops_per_token``, summed step
by step; else the FLOPs panel says they are unavailable. A train record whose step is not larger than an
earlier one marks a restart from a checkpoint: the first attempt's records from that step on are dropped.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.training.metrics import METRICS_FILE, read_metrics

FLOPS_KEYS = ("flops", "train_flops")
TOKENS_KEYS = ("consumed_tokens", "tokens")


class PlotRunsError(Exception):
    """A run directory or its metrics cannot be used; the message names the path."""


@dataclass
class Run:
    """One metric of one run: evaluation points in step order, with cumulative training FLOPs if known."""

    label: str
    path: Path
    metric: str
    split: str
    steps: list[int]
    values: list[float]
    flops: list[float | None]

    @property
    def final_value(self) -> float:
        return self.values[-1]

    @property
    def has_flops(self) -> bool:
        return any(f is not None for f in self.flops)


@dataclass
class TargetHit:
    """Where a run first reaches the target."""

    step: int
    flops: float | None


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


def _interpolate(timeline: list[tuple[int, float]], step: int) -> float | None:
    if not timeline or step > timeline[-1][0]:
        return None
    for (s0, f0), (s1, f1) in itertools.pairwise(timeline):
        if s0 <= step <= s1:
            return f0 if s1 == s0 else f0 + (f1 - f0) * (step - s0) / (s1 - s0)
    return timeline[0][1] if step == timeline[0][0] else None


def load_run(
    run_dir: str | os.PathLike, metric: str = "lm_loss", split: str = "valid", label: str | None = None
) -> Run:
    """Read ``run_dir/metrics.jsonl`` (or a metrics file given directly) into a :class:`Run`."""
    path = Path(run_dir)
    if not path.exists():
        raise PlotRunsError(f"run directory not found: {path}")
    metrics_path = path if path.is_file() else path / METRICS_FILE
    if not metrics_path.is_file():
        raise PlotRunsError(f"{metrics_path} not found (is {path} a run directory?)")
    try:
        records = _latest_attempt(read_metrics(metrics_path))
    except (OSError, ValueError) as e:
        raise PlotRunsError(f"cannot read {metrics_path}: {e}") from None
    points: dict[int, float] = {}
    own_flops: dict[int, float] = {}
    for r in records:
        if _split_of(r) != split:
            continue
        value = _number(r, (metric,))
        if value is None:
            continue
        points[r["step"]] = value  # a later record for the same step wins
        if (f := _number(r, FLOPS_KEYS)) is not None:
            own_flops[r["step"]] = f
    if not points:
        splits = sorted({_split_of(r) for r in records})
        keys = sorted({k for r in records if _split_of(r) == split for k in r} - {"step", "split"})
        raise PlotRunsError(
            f"{metrics_path} has no '{split}' records with a numeric '{metric}' "
            f"(splits present: {splits}; keys of '{split}' records: {keys})"
        )
    timeline = _flops_timeline(records)
    steps = sorted(points)
    flops = [own_flops[s] if s in own_flops else _interpolate(timeline, s) for s in steps]
    name = label or (path.parent.name if path.is_file() else path.resolve().name)
    return Run(name, path, metric, split, steps, [points[s] for s in steps], flops)


def steps_to_target(run: Run, target: float, higher_is_better: bool = False) -> TargetHit | None:
    """First evaluation point at which ``run`` reaches ``target`` (<= for losses), or None if it never does.

    No interpolation between evaluations: the answer is an evaluated step, as in the paper's comparison.
    """
    for step, value, flops in zip(run.steps, run.values, run.flops):
        if (value >= target) if higher_is_better else (value <= target):
            return TargetHit(step, flops)
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


def plot(runs: list[Run], out: str | os.PathLike, target: float | None = None) -> Path:
    """Draw loss vs step and loss vs cumulative training FLOPs; write ``out`` atomically (temp, rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
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
        ax_flops.set(xticks=[], yticks=[])
        ax_flops.text(
            0.5,
            0.5,
            "cumulative FLOPs unavailable:\nno 'flops'/'train_flops' or\n'consumed_tokens' x 'flops_per_token'\n"
            "fields in metrics.jsonl",
            ha="center",
            va="center",
            transform=ax_flops.transAxes,
        )
    else:
        if missing:
            ax_flops.text(
                0.02, 0.02, f"no FLOPs for: {', '.join(missing)}", transform=ax_flops.transAxes, fontsize=8
            )
        ax_flops.legend()
    for ax in (ax_steps, ax_flops) if any_flops else (ax_steps,):
        ax.grid(True, alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=120)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument("--out", required=True, help="image to write (png, pdf or svg by extension)")
    p.add_argument("--metric", default="lm_loss", help="metric to plot and compare (default lm_loss)")
    p.add_argument("--split", default="valid", help="records whose 'split' is this; 'train' = no split")
    p.add_argument("--target-loss", type=float, default=None, help="target value (default: reference final)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per RUN_DIR ('scratch' = reference)")
    p.add_argument("--higher-is-better", action="store_true", help="the metric is an accuracy, not a loss")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        print(
            f"error: --labels has {len(args.labels)} names for {len(args.run_dirs)} run directories",
            file=sys.stderr,
        )
        return 2
    labels = args.labels or [None] * len(args.run_dirs)
    try:
        runs = [load_run(d, args.metric, args.split, lab) for d, lab in zip(args.run_dirs, labels)]
    except PlotRunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seen: dict[str, int] = {}
    for run in runs:  # keep legend entries and table rows distinguishable
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    target, ref, rows = summarize(runs, args.target_loss, args.higher_is_better)
    out = plot(runs, args.out, target)
    print(format_table(runs, target, ref, rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
