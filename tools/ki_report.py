#!/usr/bin/env python
"""Write the KI report of a KI run against a scratch run of the same student: ki_report.md and ki_report.png.

Example::

    python tools/ki_report.py --ki runs/ki --scratch runs/scratch --teacher runs/teacher

The report gives the steps, training FLOPs (teacher forward included) and training seconds KI needed to reach
the scratch run's final validation loss, the final gap, where each student went below the teacher, KI's step
time overhead while the teacher ran against the teacher's FLOP share, and a verdict. It reads what exists, so
it works on runs still going (the verdict then says the numbers are provisional). The teacher's level is the
KI run's own validation teacher_lm_loss; ``--teacher`` (optional) is used when the KI run did not log it.
The markdown goes to stdout too; the files go to ``--out`` (default: the directory holding the KI run).

Several arms of the same student side by side (``arms_report.md`` and ``arms_report.png``; with ``--ki`` too,
both reports)::

    python tools/ki_report.py --scratch runs/scratch --teacher runs/teacher \
        --arm KI=runs/ki --arm grown=runs/grown --arm "grown + KI=runs/grown_ki"

Each arm gets the same numbers against the scratch run, and its loss before the first step
(``--train.eval_at_start true``): a student grown from the teacher starts at the teacher's level.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.errors import MegatronKIError, add_debug_argument, describe_os_error, run_main
from megatron_ki.training.report import build_ki_report, write_ki_report

PROG = "ki_report.py"


def _default_out(ki: str) -> Path:
    """The KI run's parent directory (a metrics file given directly counts as its run directory)."""
    path = Path(ki)
    run_dir = path.parent if path.is_file() else path
    return run_dir.resolve().parent


def main(argv: list[str] | None = None) -> int:
    """An expected failure (a missing run, no records to compare) is one line on stderr and exit code 1."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ki", default=None, metavar="DIR", help="the KI run directory (holds metrics.jsonl)")
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="an arm to compare with the scratch run (repeat): arms_report.md/.png",
    )
    p.add_argument("--scratch", required=True, metavar="DIR", help="the scratch run of the same student")
    p.add_argument("--teacher", default=None, metavar="DIR", help="the teacher's own run (optional)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: the KI run's parent)")
    p.add_argument("--metric", default="lm_loss", help="metric to compare (default lm_loss; lower is better)")
    p.add_argument("--split", default="valid", help="evaluation split to compare (default valid)")
    add_debug_argument(p)
    args = p.parse_args(argv)
    if args.ki is None and not args.arm:
        p.error("give --ki DIR, or one --arm LABEL=DIR or more")
    arms = {}
    for spec in args.arm:
        label, sep, path = spec.partition("=")
        if not sep or not label.strip() or not path:
            p.error(f"--arm {spec!r}: expected LABEL=DIR")
        arms[label.strip()] = path
    first = args.ki or next(iter(arms.values()))
    out = Path(args.out) if args.out is not None else _default_out(first)
    written = []
    try:
        if args.ki is not None:
            report = build_ki_report(args.ki, args.scratch, args.teacher, args.metric, args.split)
            written += write_ki_report(report, out)
            print(report.markdown())
        if arms:
            from megatron_ki.training.arms_report import build_arms_report, write_arms_report

            arms_report = build_arms_report(arms, args.scratch, args.teacher, args.metric, args.split)
            written += write_arms_report(arms_report, out)
            print(arms_report.markdown())
    except OSError as e:
        raise MegatronKIError(f"--out {out}: cannot write the report ({describe_os_error(e)})") from e
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
