"""Single-device MFU of pretrain_ki.py, from scratch and with Knowledge Inheritance (KI).

Goal (issue 6): on one H100 in bf16, a ~1B Llama-style model (``llama_1b.yaml``) and GPT-2 medium
(``gpt2_medium.yaml``) reach >= 45% MFU when trained from scratch, and KI with a teacher a quarter of the
student's size costs at most the teacher's FLOP share + 10 percentage points more time per step.

What runs: for each student config, ``pretrain_ki.py`` under the real ``deepspeed`` launcher on 1 rank
(``--num_gpus 1``; on a machine without CUDA the same with ``DS_ACCELERATOR=cpu``), twice with the same data,
batch and seed: from scratch, and with KI (``--ki.enabled true``, a constant a_t = 1 so the teacher runs on
every step, the teacher in bf16 on GPU and fp32 on CPU). Precision is bf16 on GPU and fp32 on CPU, ZeRO 0,
no evaluation, no checkpoints.

- Data: uniformly random token ids over the student's vocabulary, written as a Megatron MMIDIDX dataset with
  the project's writer and read with ``--data.tokenizer_type none`` (no tokenizer, no network). The token
  values do not change the cost of a step.
- Teacher: ``launch/configs/models/<student>_teacher.yaml`` (or ``--teachers``), same family and vocabulary,
  randomly initialised and written with the framework's checkpoint writer (timing needs no trained teacher).
  The parameter counts of both models are counted on the built framework models and printed.
- Metrics: each run's ``metrics.jsonl`` (``tokens_per_s``, ``step_time_s``, ``mfu`` per step, computed by the
  framework from ``megatron_ki/training/flops.py``: the device's dense peak, or ``MEGATRON_KI_PEAK_FLOPS`` /
  ``--peak-flops`` where the device is not in its table, e.g. a CPU). The first ``--skip`` steps are left out
  and the table shows medians of the rest. The framework charges a KI step for the student's training FLOPs
  *plus* the teacher's forward, so the KI row's MFU counts the teacher's work as useful work.
- "KI overhead %" is the KI run's median step time over the scratch run's, minus 1. "teacher FLOP share %" is
  the teacher's forward FLOPs over the student's training FLOPs (``flops.ki_flop_share``): a KI run that
  only paid for the teacher's matmuls, at the same efficiency, would show exactly that overhead.
- "peak mem GiB": the run's last ``peak_gpu_memory_gib`` (CUDA allocator peak) or, on CPU, ``peak_rss_gib``.

The defaults are sized for one 80 GB H100: llama_1b at seq 2048, micro-batch 4, global batch 32 (gradient
accumulation 8; ``--pretrain-args "--model.recompute_granularity full"`` trades a forward for activation
memory where a bigger micro-batch is wanted);
gpt2_medium at seq 1024, micro-batch 16, global batch 64. The sequence length defaults to each config's
``max_position_embeddings``.

GPU session (the device has no deepspeed installed: first ``pip install`` a deepspeed wheel, without letting
it pull another torch, e.g. ``pip install --no-deps deepspeed-*.whl`` plus its small pure-Python
dependencies; deepspeed may JIT-build its FusedAdam op on the first run, which needs ninja and nvcc)::

    python benchmarks/bench_mfu.py --workdir /tmp/bench_mfu --json $OUT/bench_mfu.json | tee $OUT/bench_mfu.md

The first runs on a fresh machine JIT-build DeepSpeed's FusedAdam and the framework's CUDA KL kernel (cached
afterwards); the skipped steps keep that out of the timings but not out of the wall time, so under a per-command
time limit build them first with a tiny run::

    python benchmarks/bench_mfu.py --tiny --device cuda --steps 2 --skip 1

One model at a time (e.g. to keep each command under a time limit; ``--workdir`` keeps the data and the
teacher checkpoints for reuse)::

    python benchmarks/bench_mfu.py --configs llama_1b --workdir /tmp/bench_mfu --json $OUT/llama.json
    python benchmarks/bench_mfu.py --configs gpt2_medium --workdir /tmp/bench_mfu --json $OUT/gpt2.json

CPU smoke test (tiny models; not a measurement of anything)::

    MEGATRON_KI_PEAK_FLOPS=1e12 python benchmarks/bench_mfu.py --tiny --steps 3 --skip 1

Reading the table: one row per (model, run). "goal" is ">= 45% MFU" on scratch rows and
"overhead <= share + 10%" on KI rows; "meets goal" compares the measured number with it ("-" where MFU is
unknown). A launch that fails prints its log's tail, is marked failed in the table, and makes the script
exit 1 after the other runs. Extra pretrain_ki.py overrides for every launch go in ``--pretrain-args``
(e.g. ``--pretrain-args "--train.zero_stage 1"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # bench_pretrain, when this file is imported rather than run
sys.path.insert(1, str(ROOT))

from bench_common import fmt, table, timed_train_steps, timing_run_args  # noqa: E402
from bench_pretrain import _deepspeed_executable, _free_port, _run  # noqa: E402

MODELS = ROOT / "launch" / "configs" / "models"
DEFAULT_CONFIGS = ("llama_1b", "gpt2_medium")
TINY_CONFIGS = ("tiny_llama", "tiny_gpt2")
# (micro batch, global batch) per student on one 80 GB H100; tiny ones for the CPU smoke test.
DEFAULT_BATCH = {"llama_1b": (4, 32), "gpt2_medium": (16, 64), "tiny_llama": (2, 4), "tiny_gpt2": (2, 4)}
MFU_GOAL_PERCENT = 45.0
KI_SLACK_PERCENT = 10.0
COLUMNS = (
    "model",
    "run",
    "batch (micro x accum x seq)",
    "student params",
    "teacher params",
    "tokens/s",
    "step ms",
    "MFU %",
    "KI overhead %",
    "teacher FLOP share %",
    "goal",
    "meets goal",
    "peak mem GiB",
    "steps timed",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated student configs (names in launch/configs/models or YAML paths); "
        f"default {','.join(DEFAULT_CONFIGS)} ({','.join(TINY_CONFIGS)} with --tiny)",
    )
    p.add_argument(
        "--teachers",
        default=None,
        help="comma-separated teacher configs, one per student; default <student>_teacher.yaml beside it",
    )
    p.add_argument(
        "--seq-length", type=int, default=None, help="default: each config's max_position_embeddings"
    )
    p.add_argument("--micro-batch", type=int, default=None, help="default: per config (see DEFAULT_BATCH)")
    p.add_argument("--global-batch", type=int, default=None, help="default: per config (see DEFAULT_BATCH)")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default 30; 6 with --tiny)"
    )
    p.add_argument(
        "--skip", type=int, default=None, help="first steps left out of the medians (default 5; 2 tiny)"
    )
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available"
    )
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (sets env)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="OMP_NUM_THREADS on CPU")
    p.add_argument("--pretrain-args", default="", help="extra pretrain_ki.py overrides for every launch")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny configs and teachers, few steps")
    p.add_argument(
        "--workdir", default=None, help="kept and reused (data, teachers, runs); default: a temp dir"
    )
    p.add_argument("--json", default=None, help="also write the result to this JSON file (after every run)")
    args = p.parse_args(argv)
    args.configs = (args.configs or ",".join(TINY_CONFIGS if args.tiny else DEFAULT_CONFIGS)).split(",")
    args.teachers = args.teachers.split(",") if args.teachers else None
    if args.teachers is not None and len(args.teachers) != len(args.configs):
        p.error(f"--teachers has {len(args.teachers)} entries for {len(args.configs)} --configs")
    args.steps = args.steps if args.steps is not None else (6 if args.tiny else 30)
    args.skip = args.skip if args.skip is not None else (2 if args.tiny else 5)
    if args.skip < 0 or args.steps <= args.skip:
        p.error(f"--steps ({args.steps}) must be larger than --skip ({args.skip}) >= 0")
    for name in ("seq_length", "micro_batch", "global_batch", "peak_flops"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def config_path(name: str) -> Path:
    """A config name (``llama_1b``) or a YAML path, resolved to an existing file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = MODELS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"bench_mfu: model config {name!r} not found (looked for {path})")
    return path.resolve()


def teacher_path_for(student: Path) -> Path:
    path = student.with_name(f"{student.stem}_teacher.yaml")
    if not path.is_file():
        raise FileNotFoundError(
            f"bench_mfu: no teacher config for {student.name}: expected {path} or give --teachers"
        )
    return path


def count_parameters(cfg) -> int:
    """Parameters of the framework's model for ``cfg``, built on the meta device (no memory, no init)."""
    import torch

    from megatron_ki.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def write_random_data(workdir: Path, vocab_size: int, num_tokens: int, seed: int = 0) -> str:
    """Uniformly random token ids as an MMIDIDX dataset; reused when already in ``workdir``."""
    import numpy as np

    from megatron_ki.data.indexed import IndexedDatasetBuilder, optimal_dtype

    prefix = workdir / "data" / f"random_v{vocab_size}_n{num_tokens}_text_document"
    if Path(f"{prefix}.idx").exists():
        return str(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < num_tokens:  # documents of 200-4000 tokens; samples cross their boundaries
        lengths.append(int(rng.integers(200, 4000)))
        total += lengths[-1]
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    tokens = rng.integers(0, vocab_size, int(lengths_arr.sum()), dtype=np.int64)
    with IndexedDatasetBuilder(prefix, optimal_dtype(vocab_size)) as builder:
        builder.add_documents(tokens, lengths_arr)
    return str(prefix)


def write_teacher(workdir: Path, teacher_cfg, seed: int = 7) -> Path:
    """A randomly initialised teacher as a weights-only framework checkpoint; reused if its config matches."""
    from megatron_ki.checkpoint_format import CheckpointError, read_meta
    from megatron_ki.config import Config
    from megatron_ki.convert.reshard import write_checkpoint
    from megatron_ki.models import build_model

    root = workdir / "teachers" / f"{teacher_cfg.family}_{teacher_cfg.num_layers}x{teacher_cfg.hidden_size}"
    try:
        _, meta = read_meta(root)
        if meta["config"]["model"] == dataclasses.asdict(teacher_cfg):
            return root
    except (CheckpointError, KeyError):
        pass
    model = build_model(teacher_cfg, seed=seed)
    full = {k: v.detach() for k, v in model.state_dict().items()}
    write_checkpoint(full, Config(model=teacher_cfg), root, tp=1, pp=1, tag="teacher")
    return root


def launch_argv(
    student: Path, data_prefix: str, run_dir: Path, shape: dict, precision: str, workdir: Path
) -> list[str]:
    return [
        "--config", str(student),
        "--data.data_path", data_prefix,
        "--data.split", "100,0,0",
        "--data.tokenizer_type", "none",
        "--data.seq_length", str(shape["seq"]),
        "--data.cache_dir", str(workdir / "index_cache"),
        "--train.train_steps", str(shape["steps"]),
        "--train.micro_batch_size", str(shape["micro"]),
        "--train.global_batch_size", str(shape["global"]),
        "--train.precision", precision,
        *timing_run_args(run_dir),
    ]  # fmt: skip


def ki_argv(teacher_dir: Path, teacher_dtype: str, steps: int) -> list[str]:
    """KI on every step: a constant a_t = 1 keeps the teacher running for the whole run."""
    return [
        "--ki.enabled", "true",
        "--ki.teacher_path", str(teacher_dir),
        "--ki.teacher_dtype", teacher_dtype,
        "--ki.schedule", "constant",
        "--ki.alpha0", "1.0",
        "--ki.decay_steps", str(steps),
    ]  # fmt: skip


def read_run(run_dir: Path, skip: int) -> dict:
    """Medians of a run's train steps after ``skip`` from its ``metrics.jsonl``."""
    timed = timed_train_steps(run_dir, skip, "bench_mfu")
    # Everything derives from the median step time, so tokens/s, step ms and MFU describe the same step
    # (medians of the per-step rates would not agree with it for an even number of steps).
    step_s = statistics.median(r["step_time_s"] for r in timed)
    last = timed[-1]
    tokens_per_step = last["tokens_per_s"] * last["step_time_s"]
    tps = tokens_per_step / step_s
    peak = None  # the framework's peak FLOP/s, recovered from a step's MFU (it is the same on every step)
    if last.get("mfu"):
        peak = last["tokens_per_s"] * last["flops_per_token"] / last["mfu"]
    return {
        "tokens_per_s": tps,
        "step_ms": 1e3 * step_s,
        "mfu_percent": 100.0 * tps * last["flops_per_token"] / peak if peak else None,
        "flops_per_token": last["flops_per_token"],
        "peak_flops": peak,
        "steps_timed": len(timed),
        "final_loss": last.get("loss"),
        "peak_memory_gib": last.get("peak_gpu_memory_gib", last.get("peak_rss_gib")),
    }


def _human(n: int | None) -> str | None:
    if n is None:
        return None
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _run_shape(args: argparse.Namespace, name: str, student, teacher) -> dict:
    """Sequence length, micro and global batch and steps of one config's runs, checked against both models."""
    micro, global_batch = DEFAULT_BATCH.get(name, (None, None))
    micro, global_batch = args.micro_batch or micro, args.global_batch or global_batch
    if micro is None or global_batch is None:
        raise ValueError(f"bench_mfu: no default batch for {name}: give --micro-batch and --global-batch")
    if global_batch % micro:
        raise ValueError(
            f"bench_mfu: --global-batch {global_batch} is not a multiple of --micro-batch {micro}"
        )
    seq = args.seq_length or student.max_position_embeddings
    for role, cfg in (("student", student), ("teacher", teacher)):
        if seq > cfg.max_position_embeddings:
            raise ValueError(f"bench_mfu: seq {seq} > max_position_embeddings {cfg.max_position_embeddings} "
                             f"of the {role} ({name})")  # fmt: skip
    return {"seq": seq, "micro": micro, "global": global_batch, "steps": args.steps}


def _launch_run(
    args: argparse.Namespace, run: str, row: dict, argv: list[str], run_dir: Path, env: dict
) -> dict:
    """Launch one pretrain_ki.py run under deepspeed and fill ``row`` with its medians (or its failure)."""
    name = row["model"]
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl is appended to
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_deepspeed_executable(), "--num_gpus", "1", "--master_port", str(_free_port()),
           str(ROOT / "pretrain_ki.py"), *argv]  # fmt: skip
    print(f"  {name} {run}: launching pretrain_ki.py ({args.steps} steps) ...", flush=True)
    try:
        wall = _run(cmd, Path(row["log"]), env=env)
        result = read_run(run_dir, args.skip)
    except RuntimeError as e:
        print(f"bench_mfu: {name} {run} failed:\n{e}", file=sys.stderr, flush=True)
        row.update(failed=True, error=str(e)[-3000:])
        return row
    row.update(
        {
            "failed": False,
            "tokens/s": result["tokens_per_s"],
            "step ms": result["step_ms"],
            "MFU %": result["mfu_percent"],
            "steps timed": result["steps_timed"],
            "flops per token": result["flops_per_token"],
            "peak flops": result["peak_flops"],
            "final loss": result["final_loss"],
            "peak mem GiB": result["peak_memory_gib"],
            "process wall s": round(wall, 1),
        }
    )
    print(f"  {name} {run}: {result['tokens_per_s']:.1f} tokens/s, {result['step_ms']:.1f} ms/step, "
          f"MFU {fmt(result['mfu_percent'])}%, {wall:.0f} s wall", flush=True)  # fmt: skip
    return row


def measure_config(
    args: argparse.Namespace, index: int, workdir: Path, on_gpu: bool, env: dict
) -> list[dict]:
    """The scratch and KI rows of one student config."""
    from megatron_ki.config import model_config_from_yaml
    from megatron_ki.training.flops import ki_flop_share

    student_path = config_path(args.configs[index])
    teacher_yaml = config_path(args.teachers[index]) if args.teachers else teacher_path_for(student_path)
    student, teacher = model_config_from_yaml(student_path), model_config_from_yaml(teacher_yaml)
    name = student_path.stem
    shape = _run_shape(args, name, student, teacher)
    seq, micro, global_batch = shape["seq"], shape["micro"], shape["global"]
    n_student, n_teacher = count_parameters(student), count_parameters(teacher)
    share = 100.0 * ki_flop_share(student, teacher, seq)
    print(f"{name}: student {n_student:,} parameters; teacher {teacher_yaml.name} {n_teacher:,} parameters "
          f"({100 * n_teacher / n_student:.1f}% of the student); teacher FLOP share {share:.1f}%; "
          f"seq {seq}, micro {micro}, global {global_batch}", flush=True)  # fmt: skip

    data_prefix = write_random_data(workdir, student.vocab_size, (args.steps + 1) * global_batch * (seq + 1))
    teacher_dir = write_teacher(workdir, teacher)
    precision, teacher_dtype = ("bf16", "bfloat16") if on_gpu else ("fp32", "float32")
    extra = shlex.split(args.pretrain_args)
    rows = []
    for run in ("scratch", "KI"):
        run_dir = workdir / "runs" / f"{name}_{run}"
        argv = launch_argv(student_path, data_prefix, run_dir, shape, precision, workdir)
        if run == "KI":
            argv += ki_argv(teacher_dir, teacher_dtype, args.steps)
        row = {
            "model": name,
            "run": run,
            "batch (micro x accum x seq)": f"{micro} x {global_batch // micro} x {seq}",
            "student params": n_student,
            "teacher params": n_teacher if run == "KI" else None,
            "teacher FLOP share %": share if run == "KI" else None,
            "log": str(run_dir.parent / f"{run_dir.name}.log"),
        }
        rows.append(_launch_run(args, run, row, [*argv, *extra], run_dir, env))
    judge(rows)
    return rows


def judge(rows: list[dict]) -> None:
    """Fill KI overhead, goal and meets-goal of a config's (scratch, KI) rows."""
    scratch, ki = rows
    for row in rows:
        row.setdefault("KI overhead %", None)
        row.setdefault("goal", None)
        row.setdefault("meets goal", None)
    scratch["goal"] = f"MFU >= {MFU_GOAL_PERCENT:.0f}%"
    if not scratch["failed"] and scratch["MFU %"] is not None:
        scratch["meets goal"] = scratch["MFU %"] >= MFU_GOAL_PERCENT
    limit = ki["teacher FLOP share %"] + KI_SLACK_PERCENT
    ki["goal"] = f"overhead <= {limit:.1f}%"
    ki["goal overhead limit %"] = limit
    if not scratch["failed"] and not ki["failed"]:
        ki["KI overhead %"] = 100.0 * (ki["step ms"] / scratch["step ms"] - 1.0)
        ki["meets goal"] = ki["KI overhead %"] <= limit


def _cell(row: dict, column: str) -> str:
    if row.get("failed") and column not in ("model", "run", "batch (micro x accum x seq)", "student params",
                                            "teacher params", "teacher FLOP share %", "goal"):  # fmt: skip
        return "failed" if column == "tokens/s" else "-"
    value = row.get(column)
    if column in ("student params", "teacher params"):
        value = _human(value)
    return fmt(value)


def markdown(result: dict) -> str:
    lines = [
        f"device: {result['device']}; precision {result['precision']}; peak FLOP/s used for MFU: "
        f"{_fmt_peak(result['peak_flops'])}; {result['steps']} steps per run, first {result['skip']} skipped, "
        f"medians; load average at start {result['load_average_start']}, at end {result['load_average']}",
        "",
        *table(COLUMNS, ([_cell(row, c) for c in COLUMNS] for row in result["rows"])),
    ]
    lines += [
        "",
        "MFU of KI rows counts the teacher's forward FLOPs as model FLOPs (the framework's accounting); "
        "KI overhead % is the KI step time over the scratch step time, minus 1.",
    ]
    return "\n".join(lines)


def _fmt_peak(value: float | None) -> str:
    return "unknown (set MEGATRON_KI_PEAK_FLOPS or --peak-flops)" if value is None else f"{value:.4g}"


def device_description(on_gpu: bool) -> str:
    """The device name without creating a CUDA context in this (parent) process."""
    if not on_gpu:
        return "cpu (DS_ACCELERATOR=cpu)"
    smi = shutil.which("nvidia-smi")
    if smi:
        import subprocess

        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "cuda"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_mfu: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if not on_gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads))
    if args.peak_flops:
        env["MEGATRON_KI_PEAK_FLOPS"] = repr(args.peak_flops)
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="bench_mfu_"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    result = {
        "device": device_description(on_gpu),
        "precision": "bf16" if on_gpu else "fp32",
        "steps": args.steps,
        "skip": args.skip,
        "load_average_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rows": [],
    }
    start = time.perf_counter()
    try:
        for i in range(len(args.configs)):
            result["rows"] += measure_config(args, i, workdir, on_gpu, env)
            result["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            peaks = [r["peak flops"] for r in result["rows"] if r.get("peak flops")]
            result["peak_flops"] = peaks[0] if peaks else None
            result["wall_s"] = round(time.perf_counter() - start, 1)
            if args.json:  # after every config, so a later crash or time limit keeps what was measured
                Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    except (FileNotFoundError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(result))
    failed = [f"{r['model']} {r['run']}" for r in result["rows"] if r["failed"]]
    if failed:
        print(f"bench_mfu: failed runs: {', '.join(failed)} (log tails above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
