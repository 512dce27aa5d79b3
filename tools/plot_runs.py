#!/usr/bin/env python
"""Plot loss curves of several runs against steps and training FLOPs, and report the compute KI saved.

Example::

    python tools/plot_runs.py runs/scratch runs/ki --labels scratch ki --out curves.png

Each RUN_DIR holds the metrics.jsonl that megatron_ki.training.metrics.MetricsWriter writes. The table gives,
for each run, the first evaluation at which ``--metric`` on ``--split`` reaches the target (default: the final
value of the run labelled "scratch", else of the last run) and the compute saved relative to that reference
run, (ref - run) / ref, in steps and in FLOPs: the paper's "KI reaches at 40k what scratch reaches at 55k".

The loading and the comparison live in megatron_ki/training/report.py (its docstring says where the FLOPs
come from and how restarts are handled), shared with tools/ki_report.py; this file is only the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.errors import MegatronKIError, UsageError, add_debug_argument, describe_os_error, run_main
from megatron_ki.training.report import (
    FLOPS_KEYS,
    TOKENS_KEYS,
    PlotRunsError,
    Run,
    TargetHit,
    _flops_timeline,
    _interpolate,
    _latest_attempt,
    compute_saved,
    format_table,
    load_run,
    plot,
    reference_index,
    steps_to_target,
    summarize,
)

# Scripts and tests written against this file import these names from it.
__all__ = [
    "FLOPS_KEYS",
    "TOKENS_KEYS",
    "PlotRunsError",
    "Run",
    "TargetHit",
    "_flops_timeline",
    "_interpolate",
    "_latest_attempt",
    "compute_saved",
    "format_table",
    "load_run",
    "main",
    "plot",
    "reference_index",
    "steps_to_target",
    "summarize",
]


PROG = "plot_runs.py"
FORMATS = (".png", ".pdf", ".svg")


def main(argv: list[str] | None = None) -> int:
    """An expected failure is one line on stderr and exit code 1 (2: a bad option)."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument("--out", required=True, help="image to write (png, pdf or svg by extension)")
    p.add_argument("--metric", default="lm_loss", help="metric to plot and compare (default lm_loss)")
    p.add_argument("--split", default="valid", help="records whose 'split' is this; 'train' = no split")
    p.add_argument("--target-loss", type=float, default=None, help="target value (default: reference final)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per RUN_DIR ('scratch' = reference)")
    p.add_argument("--higher-is-better", action="store_true", help="the metric is an accuracy, not a loss")
    add_debug_argument(p)
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        raise UsageError(f"--labels has {len(args.labels)} names for {len(args.run_dirs)} run directories")
    if os.path.splitext(args.out)[1].lower() not in FORMATS:
        raise UsageError(
            f"--out {args.out}: unknown image format, expected a name ending in {', '.join(FORMATS)}"
        )
    labels = args.labels or [None] * len(args.run_dirs)
    runs = [load_run(d, args.metric, args.split, lab) for d, lab in zip(args.run_dirs, labels)]
    seen: dict[str, int] = {}
    for run in runs:  # keep legend entries and table rows distinguishable
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    target, ref, rows = summarize(runs, args.target_loss, args.higher_is_better)
    try:
        out = plot(runs, args.out, target)
    except OSError as e:
        raise MegatronKIError(f"--out {args.out}: cannot write the plot ({describe_os_error(e)})") from e
    print(format_table(runs, target, ref, rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
