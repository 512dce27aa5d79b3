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
    p.add_argument("--ki", required=True, metavar="DIR", help="the KI run directory (holds metrics.jsonl)")
    p.add_argument("--scratch", required=True, metavar="DIR", help="the scratch run of the same student")
    p.add_argument("--teacher", default=None, metavar="DIR", help="the teacher's own run (optional)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: the KI run's parent)")
    p.add_argument("--metric", default="lm_loss", help="metric to compare (default lm_loss; lower is better)")
    p.add_argument("--split", default="valid", help="evaluation split to compare (default valid)")
    add_debug_argument(p)
    args = p.parse_args(argv)
    report = build_ki_report(args.ki, args.scratch, args.teacher, args.metric, args.split)
    out = Path(args.out) if args.out is not None else _default_out(args.ki)
    try:
        md, png = write_ki_report(report, out)
    except OSError as e:
        raise MegatronKIError(f"--out {out}: cannot write the report ({describe_os_error(e)})") from e
    print(report.markdown())
    print(f"wrote {md}")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
