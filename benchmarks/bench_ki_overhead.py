"""KI step overhead through pretrain_ki.py: the student's step with the teacher running vs the same student alone,
at the quickstart's layout (2 ranks, two pipeline stages, teacher inside the stages) and at pp = 1 (2 ranks,
data parallel, teacher beside the engine).

Goal (issue 11): overhead <= the teacher's FLOP share + 10 points, where the share is the framework's own count
(``flops_per_token`` of the KI run over the scratch run's, minus 1: the teacher's forward over the student's
training FLOPs). Every run goes through ``launch/pretrain_ki.sh`` (the real deepspeed launcher) with the
quickstart's configs (``launch/configs/quickstart/student.yaml``; the teacher's shape from ``teacher.yaml``,
randomly initialised: timing needs no trained teacher) on the embedded corpus, without evaluation; T_ki is far
beyond the run so the teacher runs at every step. The two arms alternate ``--repeats`` times so load from other
jobs hits both alike; the table shows the median step time after ``--skip`` steps over all repeats.

    python benchmarks/bench_ki_overhead.py --workdir /tmp/bko          # 30 steps, 2 repeats, both layouts
    python benchmarks/bench_ki_overhead.py --repo /tmp/old-checkout     # time another checkout's pretrain_ki.py

``--repo`` runs another checkout's ``launch/pretrain_ki.sh`` and ``pretrain_ki.py`` (same configs and data), so
one script measures before and after a change; ``--partition parameters`` times the pipeline split by
DeepSpeed's parameter balance instead of the quickstart's compute balance; ``--micro-batch-size`` changes the
number of micro-batches per step (the global batch stays). ``--stage-timers`` also logs where
each stage's time goes (``logging.stage_timers``: forward, backward, waiting on a send or receive, the rest) and
prints it per layout, arm and stage (medians over the timed steps). Prints markdown tables; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import load_text, table, timed_train_steps, timing_run_args  # noqa: E402
from quickstart import Launcher, QuickstartError, prepare_data  # noqa: E402

QUICKSTART = ROOT / "launch" / "configs" / "quickstart"
LAYOUTS = {"quickstart (pp=2)": [], "pp=1 (dp=2)": ["--parallel.pipeline_parallel", "1"]}
GOAL_POINTS = 10.0
COLUMNS = (
    "layout", "scratch step ms", "KI step ms", "overhead %", "teacher FLOP share %", "goal <= %", "meets goal",
    "steps timed",
)  # fmt: skip


TEACHER_CODE = """
import sys
from pathlib import Path
from megatron_ki.config import Config, model_config_from_yaml
from megatron_ki.convert.reshard import write_checkpoint
from megatron_ki.models import build_model
cfg = model_config_from_yaml(sys.argv[1])
cfg = type(cfg)(**{**cfg.__dict__, "vocab_size": int(sys.argv[3])})
state = {k: v.detach().clone() for k, v in build_model(cfg, seed=7).state_dict().items()}
write_checkpoint(state, Config(model=cfg), Path(sys.argv[2]), tp=1, pp=1, tag="teacher")
"""


def write_teacher(root: Path, vocab_size: int, repo: Path) -> Path:
    """A randomly initialised teacher of the quickstart's shape, written by ``repo``'s own code (so the timed
    checkout can read its checkpoint format)."""
    cmd = [sys.executable, "-c", TEACHER_CODE, str(QUICKSTART / "teacher.yaml"), str(root), str(vocab_size)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return root


class Timer:
    """Runs one arm of one layout through the launcher and reads its timed steps."""

    def __init__(self, launcher: Launcher, work: Path, data_args: list[str], args: argparse.Namespace):
        self.launcher, self.work, self.data_args, self.args = launcher, work, data_args, args

    def run(self, layout: str, arm: str, repeat: int, ki: list[str]) -> list[dict[str, Any]]:
        run_dir = self.work / "runs" / f"{layout.split()[0]}_{arm}_{repeat}"
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        overrides = [*self.data_args, *LAYOUTS[layout], "--train.train_steps", str(self.args.steps)]
        if self.args.partition is not None:
            overrides += ["--parallel.pipeline_partition", self.args.partition]
        if self.args.micro_batch_size is not None:
            overrides += ["--train.micro_batch_size", str(self.args.micro_batch_size)]
        overrides += [*timing_run_args(run_dir), *ki]
        if self.args.stage_timers:
            overrides += ["--logging.stage_timers", "true"]
        self.launcher.train(QUICKSTART / "student.yaml", overrides, run_dir, f"{layout}: {arm} #{repeat}")
        return timed_train_steps(run_dir, self.args.skip, "bench_ki_overhead")


def measure(timer: Timer, layout: str, teacher: Path, repeats: int) -> dict[str, Any]:
    ki = ["--ki.enabled", "true", "--ki.teacher_path", str(teacher), "--ki.decay_steps", "1000000"]
    steps: dict[str, list[dict[str, Any]]] = {"scratch": [], "ki": []}
    for repeat in range(repeats):
        order = ("scratch", "ki") if repeat % 2 == 0 else ("ki", "scratch")
        for arm in order:
            steps[arm] += timer.run(layout, arm, repeat, ki if arm == "ki" else [])
    stages = {arm: stage_breakdown(recs) for arm, recs in steps.items()}
    ms = {arm: 1000 * statistics.median(r["step_time_s"] for r in recs) for arm, recs in steps.items()}
    fpt = {arm: statistics.median(r["flops_per_token"] for r in recs) for arm, recs in steps.items()}
    share = 100.0 * (fpt["ki"] / fpt["scratch"] - 1.0)
    overhead = 100.0 * (ms["ki"] / ms["scratch"] - 1.0)
    return {
        "layout": layout,
        "scratch_ms": ms["scratch"],
        "ki_ms": ms["ki"],
        "overhead_pct": overhead,
        "flop_share_pct": share,
        "goal_pct": share + GOAL_POINTS,
        "meets_goal": overhead <= share + GOAL_POINTS,
        "steps_timed": len(steps["ki"]),
        "stages": stages,
    }


STAGE_PARTS = {
    "forward": ("forward_pass",),
    "backward": ("backward_pass",),
    "send/recv": ("send_activation", "recv_activation", "send_grad", "recv_grad"),
    "rest": ("load_micro_batch", "reduce_tied_grads", "reduce_grads", "optimizer_step"),
}
STAGE_COLUMNS = ("layout", "arm", "stage", *(f"{k} ms" for k in STAGE_PARTS), "step ms")


def stage_breakdown(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per stage, the median over ``records`` of each part of :data:`STAGE_PARTS` (empty without timers)."""
    out = []
    for stage in range(8):
        prefix = f"stage{stage}_"
        if not any(k.startswith(prefix) for k in records[0]):
            break
        row = {
            part: statistics.median(sum(r.get(f"{prefix}{k}_ms", 0.0) for k in kinds) for r in records)
            for part, kinds in STAGE_PARTS.items()
        }
        row["step"] = statistics.median(1000 * r["step_time_s"] for r in records)
        out.append(row)
    return out


def stage_cells(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (r["layout"], arm, str(s), *(f"{st[p]:.1f}" for p in STAGE_PARTS), f"{st['step']:.1f}")
        for r in rows
        for arm in ("scratch", "ki")
        for s, st in enumerate(r["stages"][arm])
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ki_overhead"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps of each run left out")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose pretrain_ki.py is timed")
    p.add_argument(
        "--partition", default=None, help="parallel.pipeline_partition for every run (default: the config's)"
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="train.micro_batch_size for every run (default: the config's; the global batch stays)",
    )
    p.add_argument("--max-docs", type=int, default=0, help="demo-corpus documents (0: all)")
    p.add_argument("--stage-timers", action="store_true", help="log and print each stage's time per part")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.steps <= args.skip:
        p.error(f"--steps ({args.steps}) must be larger than --skip ({args.skip})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vocab = 4000
    try:
        data = prepare_data(None, args.workdir / "data", vocab, max_docs=args.max_docs)
    except QuickstartError as e:
        print(f"bench_ki_overhead: {e}", file=sys.stderr)
        return 1
    teacher = write_teacher(args.workdir / "teacher", vocab, args.repo.resolve())
    launcher = Launcher(2, quiet=True, repo=args.repo.resolve())
    timer = Timer(launcher, args.workdir, [*data.args(), "--logging.tensorboard", "false"], args)
    before = os.getloadavg()
    try:
        rows = [measure(timer, layout, teacher, args.repeats) for layout in args.layouts]
    except QuickstartError as e:
        print(f"bench_ki_overhead: {e}", file=sys.stderr)
        return 1
    cells = [
        (
            r["layout"],
            f"{r['scratch_ms']:.1f}",
            f"{r['ki_ms']:.1f}",
            f"{r['overhead_pct']:+.1f}",
            f"{r['flop_share_pct']:.1f}",
            f"{r['goal_pct']:.1f}",
            "yes" if r["meets_goal"] else "no",
            str(r["steps_timed"]),
        )
        for r in rows
    ]
    print("\n".join(table(COLUMNS, cells)))
    if args.stage_timers:
        print("\nWhere each stage's time goes (medians over the timed steps):\n")
        print("\n".join(table(STAGE_COLUMNS, stage_cells(rows))))
    print(f"\nrepo {args.repo}; load average before {load_text(before)}, after {load_text(os.getloadavg())}")
    if args.json is not None:
        result = {
            "repo": str(args.repo),
            "partition": args.partition,
            "micro_batch_size": args.micro_batch_size,
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
