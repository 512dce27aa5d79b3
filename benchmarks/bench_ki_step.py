"""KI step overhead: training-step time of student + frozen teacher vs the same student alone.

Goal (issue 5): the KI step costs at most the teacher's forward FLOPs as a share of the student's training
FLOPs (``megatron_ki.training.flops.ki_flop_share``) plus 10 percentage points over the student-only step.

Everything runs through the framework's own path, single process: the student from ``build_model``, the
teacher from ``ki.teacher.frozen_teacher`` (eval, no grad, stored in ``--teacher-dtypes``), the loss from
``ki.ki_loss`` with the kernels backend "auto" (the compiled KL op when it builds, else the PyTorch
reference), backward, then a torch AdamW step. The baseline calls the same ``ki_loss`` with no teacher and
alpha 0 (the LM loss only). The configurations are stepped round-robin (the order rotating each round) so
that load from other processes on a shared machine hits all rows alike; the table shows the median step
after ``--warmup`` steps, and the median time of the teacher's forward inside the KI step, which explains
a slow row (bf16 matmuls on a CPU without native bf16 units are often slower than fp32: compare the rows),
and a second table splits each step into phases. "overhead % (min)" compares the fastest steps, the ones
least disturbed by other jobs on a shared machine. The FLOP share counts matmuls only; the KL over the
full vocabulary (softmax statistics of both logits, its gradient) is elementwise work it leaves out, seen
in the "loss fwd" and "backward" phases: small beside a large model, a few percent of a small CPU one.

    python benchmarks/bench_ki_step.py                       # CPU: student 6/512, teacher 3/320, fp32
    python benchmarks/bench_ki_step.py --steps 3 --warmup 1  # quicker
    python benchmarks/bench_ki_step.py --device cuda         # GPU: student under bf16 autocast

Prints a markdown table (and writes it as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from bench_common import fmt, load_text, table

COLUMNS = (
    "run",
    "teacher dtype",
    "student params",
    "teacher params",
    "step ms (median)",
    "step ms (min)",
    "teacher fwd ms",
    "overhead %",
    "teacher FLOP share %",
    "goal <= %",
    "meets goal",
    "overhead % (min)",
)

PHASES = ("student fwd", "teacher fwd", "loss fwd", "backward", "optimizer")


@dataclass
class Row:
    """One configuration being timed: its student, optimizer, optional teacher, and the samples taken."""

    name: str
    student: object
    optimizer: object
    teacher: object | None = None
    teacher_dtype: str | None = None
    step_times: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6, help="student layers")
    p.add_argument("--hidden", type=int, default=512, help="student hidden size")
    p.add_argument("--heads", type=int, default=8, help="student attention heads")
    p.add_argument("--teacher-layers", type=int, default=3)
    p.add_argument("--teacher-hidden", type=int, default=320)
    p.add_argument("--teacher-heads", type=int, default=5)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument(
        "--teacher-dtypes",
        nargs="+",
        default=["bfloat16", "float32"],
        choices=["bfloat16", "float32", "float16"],
        help="one KI row per teacher dtype (bfloat16 is the framework's default)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight a_t during the timed steps (> 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="student compute: fp32 (CPU default) or bf16 autocast (GPU default)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.alpha <= 1.0:
        p.error(f"--alpha must be in (0, 1] so the KD term runs, got {args.alpha}")
    return args


def cpu_bf16_support() -> str:
    """torch's CPU kernel level and whether the CPU has bf16 matmul units (AVX512-BF16 or AMX-BF16).

    Without them bf16 matmuls have no native instructions (torch falls back to converting kernels), so a
    bf16 teacher usually runs slower than an fp32 one.
    """
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = set(next((x for x in f if x.startswith("flags")), "").split())
    except OSError:
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{torch.backends.cpu.get_cpu_capability()}, bf16 units: {', '.join(native) if native else 'none'}"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_and_precision(args: argparse.Namespace):
    """The torch device to run on and the student's compute precision ("fp32" or "bf16")."""
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ki_step: --device cuda but torch.cuda.is_available() is False")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, precision


def _model_configs(args: argparse.Namespace):
    """The student's and the teacher's GPT-2 ``ModelConfig`` from the command line."""
    from megatron_ki.config import ModelConfig

    def gpt(layers: int, hidden: int, heads: int) -> ModelConfig:
        return ModelConfig(
            family="gpt2",
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=4 * hidden,
            vocab_size=args.vocab,
            max_position_embeddings=args.seq,
        )

    student_cfg = gpt(args.layers, args.hidden, args.heads)
    teacher_cfg = gpt(args.teacher_layers, args.teacher_hidden, args.teacher_heads)
    return student_cfg, teacher_cfg


def _build_rows(args: argparse.Namespace, student_cfg, teacher_cfg, device) -> list[Row]:
    """The student-only row, then one KI row per teacher dtype, each with its own student and AdamW."""
    import torch

    from megatron_ki.config import KIConfig
    from megatron_ki.ki.teacher import frozen_teacher
    from megatron_ki.models import build_model

    def new_student():
        model = build_model(student_cfg, seed=0).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
        return model, opt

    rows = [Row("student only", *new_student())]
    for dtype in args.teacher_dtypes:
        teacher = frozen_teacher(teacher_cfg, KIConfig(teacher_dtype=dtype), None, seed=1, device=device)
        rows.append(Row("student + teacher (KI)", *new_student(), teacher=teacher, teacher_dtype=dtype))
    return rows


def _train_step(
    row: Row, inputs, labels, autocast, alpha: float, device
) -> tuple[float, dict[str, float], float]:
    """One training step; its wall time and the time of each phase (synchronised on GPU)."""
    import torch

    from megatron_ki.ki import ki_loss

    phases: dict[str, float] = {}
    _sync(device)
    start = mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        _sync(device)
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    row.optimizer.zero_grad(set_to_none=True)
    with autocast:
        logits = row.student(inputs)
        lap("student fwd")
        teacher_logits = None
        if row.teacher is not None:
            with torch.no_grad():
                teacher_logits = row.teacher(inputs)
            lap("teacher fwd")
    out = ki_loss(
        logits,
        teacher_logits,
        labels,
        alpha if teacher_logits is not None else 0.0,
        temperature=2.0,
        backend="auto",
    )
    lap("loss fwd")
    out.loss.backward()
    lap("backward")
    row.optimizer.step()
    lap("optimizer")
    return mark - start, phases, float(out.loss.detach())


def _time_rows(args: argparse.Namespace, rows: list[Row], step) -> None:
    """``--warmup`` untimed steps per row, then ``--steps`` timed ones round-robin, recorded in the rows."""
    for _ in range(args.warmup):
        for row in rows:
            step(row)
    for i in range(args.steps):
        k = i % len(rows)
        for row in rows[k:] + rows[:k]:  # rotate who goes first so drift in machine load hits every row
            elapsed, phases, loss = step(row)
            row.step_times.append(elapsed)
            for name, seconds in phases.items():
                row.phases.setdefault(name, []).append(seconds)
            row.losses.append(loss)


def _kl_backend(device) -> str:
    """Which KL implementation backend="auto" ran (ki.loss takes the compiled op when it loads)."""
    import torch

    try:
        from megatron_ki.kernels import select_backend

        return select_backend("kl_forward_stats", torch.empty(0, device=device))[0]
    except Exception as e:  # the kernels package itself failed: ki_loss fell back to torch
        return f"PyTorch (kernels unusable: {e})"


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _result_rows(rows: list[Row], share: float) -> list[dict]:
    """The table's rows (and the JSON's): medians, minimums, overheads against the student-only row."""
    base = statistics.median(rows[0].step_times)
    goal = 100.0 * share + 10.0
    table = []
    for row in rows:
        median = statistics.median(row.step_times)
        phase_ms = {name: 1e3 * statistics.median(times) for name, times in row.phases.items()}
        overhead = None if row.teacher is None else 100.0 * (median - base) / base
        table.append(
            {
                "run": row.name,
                "teacher dtype": row.teacher_dtype or "-",
                "student params": _n_params(row.student),
                "teacher params": _n_params(row.teacher) if row.teacher is not None else None,
                "step ms (median)": 1e3 * median,
                "step ms (min)": 1e3 * min(row.step_times),
                "teacher fwd ms": phase_ms.get("teacher fwd"),
                "overhead %": overhead,
                "teacher FLOP share %": 100.0 * share if row.teacher is not None else None,
                "goal <= %": goal if row.teacher is not None else None,
                "meets goal": None if overhead is None else overhead <= goal,
                "overhead % (min)": None
                if row.teacher is None
                else 100.0 * (min(row.step_times) / min(rows[0].step_times) - 1.0),
                "step ms (all)": [1e3 * t for t in row.step_times],
                "phase ms (median)": phase_ms,
                "final loss": row.losses[-1],
            }
        )
    return table


def measure(args: argparse.Namespace) -> dict:
    """Build the rows, time them round-robin, and return the table's rows plus the run's facts."""
    import torch

    from megatron_ki.training.flops import ki_flop_share

    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, precision = _device_and_precision(args)
    student_cfg, teacher_cfg = _model_configs(args)
    share = ki_flop_share(student_cfg, teacher_cfg, args.seq)
    rows = _build_rows(args, student_cfg, teacher_cfg, device)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    _time_rows(args, rows, lambda row: _train_step(row, inputs, labels, autocast, args.alpha, device))
    kl_path = _kl_backend(device)
    return {
        "device": str(device),
        "precision": precision,
        "kl_backend": kl_path,
        "cpu": cpu_bf16_support(),
        "threads": torch.get_num_threads(),
        "load_average_start": load_at_start,
        "load_average": os.getloadavg(),
        "student": f"gpt2 {args.layers} layers, hidden {args.hidden}, heads {args.heads}",
        "teacher": (
            f"gpt2 {args.teacher_layers} layers, hidden {args.teacher_hidden}, heads {args.teacher_heads}"
        ),
        "shape": (
            f"batch {args.batch} x seq {args.seq}, vocab {args.vocab} "
            f"(padded {student_cfg.padded_vocab_size(1)})"
        ),
        "ki_flop_share": share,
        "rows": _result_rows(rows, share),
    }


def markdown(result: dict) -> str:
    lines = [
        f"device {result['device']}, student compute {result['precision']}, {result['threads']} threads, "
        f"load average (1/5/15 min) at start {load_text(result['load_average_start'])}, "
        f"at end {load_text(result['load_average'])}, KL on the {result['kl_backend']}",
        f"CPU: {result['cpu']}",
        f"student: {result['student']}; teacher: {result['teacher']}; {result['shape']}",
        "",
    ]
    lines += table(COLUMNS, ([fmt(row[c], int_millions=True) for c in COLUMNS] for row in result["rows"]))
    lines += ["", "Median time of each phase (ms), where the overhead goes:", ""]
    phase_rows = []
    for row in result["rows"]:
        ms = row["phase ms (median)"]
        phase_rows.append(
            [row["run"], row["teacher dtype"], *(fmt(ms.get(p), int_millions=True) for p in PHASES)]
        )
    lines += table(["run", "teacher dtype", *PHASES], phase_rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
