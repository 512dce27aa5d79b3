"""Offline teacher targets at CPU scale: storage, teacher-pass speed, student step overhead and convergence.

GPT (``--family gpt``) or RoBERTa (``--family roberta``: every run, the precompute included, masks statically with
``--mask-seed``, so the offline targets are the teacher's view of the masked tokens the students see), on the data
of ``bench_ki_convergence.py`` and with its models:
1. the corpus is tokenized once (``--max-tokens`` keeps every n-th document of it, so the precompute fits the
   time at hand), and a small teacher is trained on it (or ``--teacher CKPT`` with ``--data-prefix`` and
   ``--tokenizer-model`` reuses one and the data it was trained on);
2. ``tools/precompute_teacher.py`` runs under ``launch/pretrain_ki.sh`` at each K of ``--ks`` (fp16 values), and
   once more at ``--int8-k`` with int8 values: bytes per token of the dataset (the .bin's size, plus the .pos's for
   a masked-LM teacher, whose rows are the masked tokens only, / the dataset's tokens) and the teacher pass's
   tokens/s (over the tool's wall clock, start-up included, and over its own compute time when it prints one);
3. students of bench_ki_convergence's GPT shape, ``--steps`` steps, ``--seeds`` seeds, the same data order:
   scratch, online KI (the teacher runs every step) and offline KI at each K (``--ki.teacher_targets``), KI at
   the precompute's temperature with a_t linear from ``--alpha0`` to 0 over the first half. Each KI run is compared with
   the scratch run of its seed by ``megatron_ki.training.report.build_ki_report``: final validation loss, the
   step at which it reaches scratch's final loss, and the median step time while the KD term is on against
   scratch's on the same steps (the student's step overhead; goal for offline KI: under 5%).
4. Offline KI at K >= 32 against online KI: the gap of the mean final losses is compared with the seed spread
   of online KI (max - min over seeds); with one seed the spread is unknown and nothing is claimed.

    python benchmarks/bench_offline_targets.py --max-tokens 1000000 --json /tmp/bench_offline.json
    python benchmarks/bench_offline_targets.py --quick --workdir /tmp/bot    # smoke test: tiny, minutes

Prints markdown tables; ``--json`` writes them with the machine's load averages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import load_text, table  # noqa: E402
from bench_ki_convergence import BOOKS, FULL, QUICK, Bench, Family, cell, families, seed_spread  # noqa: E402
from quickstart import Data, Launcher, QuickstartError, prepare_data  # noqa: E402

from megatron_ki.training.report import build_ki_report  # noqa: E402

TOOL = ROOT / "tools" / "precompute_teacher.py"
OVERHEAD_GOAL_PCT = 5.0
"""Largest step overhead of a student trained from offline targets against scratch (issue 15)."""
MIN_K_VS_ONLINE = 32
"""Offline KI at K >= this is compared with online KI (issue 15's convergence goal)."""
TOOL_SECONDS = re.compile(r"wrote .* in ([0-9.]+) s")
"""The precompute tool's last line ends with its own compute time (teacher load and rows, no start-up)."""


# ----------------------------------------------------------------------------------------------- data
def slice_data(data: Data, max_tokens: int, work: Path) -> tuple[Data, int]:
    """Every n-th document of ``data`` up to about ``max_tokens`` tokens (0: all of it); the slice's tokens.

    A stride rather than the first documents keeps every book in the slice, so the train/valid split still
    draws from the whole corpus. The sidecar records the source's document separator."""
    import numpy as np

    from megatron_ki.data.indexed import IndexedDataset, IndexedDatasetBuilder, read_stats, write_stats

    src = IndexedDataset(data.prefix)
    total = int(src.num_tokens)
    if max_tokens <= 0 or max_tokens >= total:
        return data, total
    stride = -(-total // max_tokens)
    prefix = work / f"slice_every{stride}"
    work.mkdir(parents=True, exist_ok=True)
    lo, hi, tokens, docs = None, None, 0, 0
    with IndexedDatasetBuilder(prefix, dtype=src.dtype) as builder:
        for i in range(0, len(src), stride):
            doc = np.asarray(src[i])
            builder.add_document(doc)
            tokens, docs = tokens + len(doc), docs + 1
            lo = int(doc.min()) if lo is None else min(lo, int(doc.min()))
            hi = int(doc.max()) if hi is None else max(hi, int(doc.max()))
    stats = {k: v for k, v in (read_stats(data.prefix) or {}).items() if k not in ("bin", "version")}
    stats = {k: v for k, v in stats.items() if not k.startswith("bin_")}
    stats.update(num_tokens=tokens, num_documents=docs, num_sequences=docs, min_token_id=lo, max_token_id=hi)
    stats["source"] = f"bench_offline_targets.py: every {stride}th document of {data.prefix}"
    write_stats(prefix, stats)
    return dataclasses.replace(data, prefix=str(prefix)), tokens


# ----------------------------------------------------------------------------------------- precompute
def clear_targets(path: Path) -> None:
    """Remove a previous precompute at ``path``: the tool skips an identical published pair, which would time
    nothing."""
    from megatron_ki.data.teacher_targets import bin_file, idx_file, progress_dir, tmp_bin_file

    for name in (idx_file(str(path)), bin_file(str(path)), tmp_bin_file(str(path))):
        Path(name).unlink(missing_ok=True)
    shutil.rmtree(progress_dir(str(path)), ignore_errors=True)


def launch_tool(launcher: Launcher, args: list[str], what: str) -> tuple[float, str]:
    """Run the precompute tool under launch/pretrain_ki.sh; (wall seconds, its output)."""
    cmd = ["bash", str(ROOT / "launch" / "pretrain_ki.sh"), *args]
    print(f"\n==> {what}\n    ENTRY={TOOL} {' '.join(cmd)}", flush=True)
    env = {**os.environ, **launcher.env(), "ENTRY": str(TOOL)}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
        raise QuickstartError(f"step '{what}' failed with exit code {proc.returncode} (its output is above)")
    lines = [x for x in proc.stdout.splitlines() if "precompute" in x and "DeepSpeed" not in x]
    print("    " + "\n    ".join(lines[-2:]) + f"\n    done in {wall:.0f} s", flush=True)
    return wall, proc.stdout


def precompute(
    bench: Bench, family: Family, teacher: Path, k: int, values: str, tau: float
) -> dict[str, Any]:
    """One precompute at K with ``values``: its files' bytes per token and the teacher pass's throughput."""
    from megatron_ki.data.teacher_targets import bin_file, pos_file, read_header

    out = bench.work / family.name / "targets" / f"k{k}_{values}"
    clear_targets(out)
    args = [
        "--config", str(family.config), *family.extra,
        "--output", str(out), "--top-k", str(k), "--values", values, "--temperature", str(tau),
        "--ki.teacher_path", str(teacher), "--ki.teacher_dtype", "float32",
        *bench.data.args(), "--data.tokenizer_type", "SentencePieceTokenizer",
    ]  # fmt: skip
    wall, output = launch_tool(bench.launcher, args, f"{family.name}: precompute K={k} {values}")
    bench.wall[f"{family.name}/precompute_k{k}_{values}"] = wall
    header = read_header(str(out))
    rows, tokens = int(header["num_rows"]), int(header["dataset"]["num_tokens"])
    size = os.path.getsize(bin_file(str(out)))
    size += os.path.getsize(pos_file(str(out))) if header.get("masking") else 0
    found = TOOL_SECONDS.findall(output)
    compute_s = float(found[-1]) if found else None
    vocab = int(header["vocab_size"])
    return {
        "k": k, "values": values, "path": str(out), "tokens": tokens, "rows": rows, "bin_bytes": size,
        "bytes_per_token": size / tokens, "row_bytes": int(header["row_bytes"]),
        "dense_fp16_ratio": 2 * vocab / (size / tokens), "wall_s": wall, "compute_s": compute_s,
        "tokens_per_s_wall": tokens / wall, "tokens_per_s_compute": tokens / compute_s if compute_s else None,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- students
def train_students(
    bench: Bench, family: Family, teacher: Path, targets: dict[int, str], tau: float, alpha0: float = 1.0
) -> dict[int, dict[str, Path]]:
    """Per seed: scratch, online KI and offline KI at each K, one after the other (same data order)."""
    temperature = ["--ki.temperature", str(tau), "--ki.alpha0", str(alpha0)]
    runs: dict[int, dict[str, Path]] = {}
    for seed in bench.seeds:
        arms = {"scratch": bench.student(family, f"scratch_seed{seed}", seed, None)}
        online = ["--ki.teacher_path", str(teacher), *temperature]
        arms["online"] = bench.student(family, f"online_seed{seed}", seed, online)
        for k, path in targets.items():
            offline = ["--ki.teacher_targets", path, *temperature]
            arms[f"offline K={k}"] = bench.student(family, f"offline_k{k}_seed{seed}", seed, offline)
        runs[seed] = arms
    return runs


def student_row(arm: str, seed: int, run_dir: Path, scratch_dir: Path) -> dict[str, Any]:
    """One student against the scratch run of its seed (scratch against itself: its own final and step)."""
    r = build_ki_report(run_dir, scratch_dir)
    hit, ref, o = r.ki_hit, r.scratch_hit, r.overhead
    met = o.overhead_pct < OVERHEAD_GOAL_PCT if o and arm.startswith("offline") else None
    return {
        "arm": arm,
        "seed": seed,
        "final": r.ki.final_value,
        "target": r.target,
        "step_at_target": hit.step if hit else None,
        "scratch_step_at_target": ref.step if ref else None,
        "steps_pct": 100.0 * hit.step / ref.step if hit and ref else None,
        "kd_step_ms": 1e3 * o.ki_step_time_s if o and arm != "scratch" else None,
        "scratch_step_ms": 1e3 * o.scratch_step_time_s if o else None,
        "kd_steps_timed": o.n_steps if o and arm != "scratch" else None,
        "overhead_pct": o.overhead_pct if o and arm != "scratch" else None,
        "overhead_goal_met": met,
    }


def scratch_step_ms(run_dir: Path, last_step: int | None) -> float | None:
    """Scratch's median step time over the steps a KD term would be on (after warm-up, up to ``last_step``)."""
    from megatron_ki.training.metrics import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split", "train") == "train"]
    last = last_step or records[-1]["step"] if records else 0
    times = [r["step_time_s"] for r in records if r.get("step_time_s") and 3 < r["step"] <= last]
    return 1e3 * statistics.median(times) if times else None


def student_rows(runs: dict[int, dict[str, Path]], kd_steps: int) -> list[dict[str, Any]]:
    rows = []
    for seed, arms in runs.items():
        for arm, run_dir in arms.items():
            row = student_row(arm, seed, run_dir, arms["scratch"])
            if arm == "scratch":
                row["scratch_step_ms"] = scratch_step_ms(run_dir, kd_steps)
            rows.append(row)
    return rows


def offline_vs_online(rows: list[dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Offline KI at each K >= MIN_K_VS_ONLINE against online KI: the gap of mean finals vs online's seed spread."""
    online = [r["final"] for r in rows if r["arm"] == "online"]
    spread = seed_spread(online) if len(online) > 1 else None
    out = []
    for k in (k for k in ks if k >= MIN_K_VS_ONLINE):
        offline = [r["final"] for r in rows if r["arm"] == f"offline K={k}"]
        gap = statistics.fmean(offline) - statistics.fmean(online)
        if spread is None:
            verdict = "seed spread unknown (one seed): nothing claimed"
        elif abs(gap) <= spread:
            verdict = "within the seed spread of online KI"
        else:
            verdict = "better than online KI beyond the seed spread" if gap < 0 else "worse than online KI"
        out.append(
            {
                "k": k,
                "seeds": len(offline),
                "offline_final": statistics.fmean(offline),
                "online_final": statistics.fmean(online),
                "gap": gap,
                "online_seed_spread": spread,
                "goal_met": None if spread is None else gap <= spread,
                "verdict": verdict,
            }
        )
    return out


# ------------------------------------------------------------------------------------------- report
PRECOMPUTE_COLUMNS = (
    "K", "values", "tokens", "rows", ".bin (+.pos) MB", "bytes/token", "dense fp16 / this", "tool wall s", "tokens/s (wall)",
    "tool compute s", "tokens/s (compute)",
)  # fmt: skip
STUDENT_COLUMNS = (
    "run", "seed", "final valid loss", "step@scratch final", "scratch step", "steps %", "KD-on step ms",
    "scratch step ms", "steps timed", "overhead %", "< 5% (offline)",
)  # fmt: skip
VS_COLUMNS = ("K", "seeds", "offline final", "online final", "gap", "online spread", "goal met", "verdict")


def precompute_cells(p: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(p["k"]), p["values"], str(p["tokens"]), str(p.get("rows", p["tokens"])), cell(p["bin_bytes"] / 1e6, ".1f"),
        cell(p["bytes_per_token"], ".1f"), cell(p["dense_fp16_ratio"], ".1f", "x"), cell(p["wall_s"], ".1f"),
        cell(p["tokens_per_s_wall"], ".0f"), cell(p["compute_s"], ".1f"), cell(p["tokens_per_s_compute"], ".0f"),
    )  # fmt: skip


def student_cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        r["arm"], str(r["seed"]), cell(r["final"]), cell(r["step_at_target"]), cell(r["scratch_step_at_target"]),
        cell(r["steps_pct"], ".1f"), cell(r["kd_step_ms"], ".1f"), cell(r["scratch_step_ms"], ".1f"),
        cell(r["kd_steps_timed"]), cell(r["overhead_pct"], "+.1f"), cell(r["overhead_goal_met"]),
    )  # fmt: skip


def vs_cells(v: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(v["k"]), str(v["seeds"]), cell(v["offline_final"]), cell(v["online_final"]), cell(v["gap"], "+.4f"),
        cell(v["online_seed_spread"]), cell(v["goal_met"]), v["verdict"],
    )  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Teacher pass and storage ({result['family']}, {result['tokens']} tokens, vocabulary {result['vocab_size']}, "
        f"temperature {result['temperature']}, {result['ranks']} ranks):",
        "",
        *table(PRECOMPUTE_COLUMNS, [precompute_cells(p) for p in result["precompute"]]),
        "",
        "Students (each against the scratch run of its seed; step times are medians over the steps with the KD "
        "term on, after the first 3):",
        "",
        *table(STUDENT_COLUMNS, [student_cells(r) for r in result["students"]]),
        "",
        f"Offline KI at K >= {MIN_K_VS_ONLINE} vs online KI (mean final valid loss over seeds):",
        "",
        *table(VS_COLUMNS, [vs_cells(v) for v in result["offline_vs_online"]]),
        "",
        f"load average: start {result['load']['start']}, end {result['load']['end']}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_offline_targets"))
    p.add_argument("--corpus", type=Path, default=None, help="default: ../shared/data/books/train if present")
    p.add_argument("--max-tokens", type=int, default=0, help="keep every n-th document up to ~N tokens [all]")
    p.add_argument("--teacher", type=Path, default=None, help="reuse this teacher (needs --data-prefix)")
    p.add_argument("--data-prefix", default=None, help="already tokenized data (with --tokenizer-model)")
    p.add_argument("--tokenizer-model", default=None, help="the sentencepiece model of --data-prefix")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128], help="top-K values to precompute")
    p.add_argument("--int8-k", type=int, default=32, help="also precompute this K with int8 values (0: skip)")
    p.add_argument("--temperature", type=float, default=1.0, help="KI and precompute temperature [1.0]")
    p.add_argument("--steps", type=int, default=None, help="student steps [400; --quick 8]")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps [400; --quick 8]")
    p.add_argument("--seeds", type=int, default=1, help="seeds per student arm [1]")
    p.add_argument("--family", choices=("gpt", "roberta"), default="gpt", help="teacher and students [gpt]")
    p.add_argument(
        "--mask-seed", type=int, default=1, help="roberta: the static mask's seed (data.mask_seed)"
    )
    p.add_argument("--alpha0", type=float, default=1.0, help="a_t at step 0 of every KI student [1.0]")
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps, the embedded corpus")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.teacher is not None and (args.data_prefix is None or args.tokenizer_model is None):
        p.error("--teacher needs --data-prefix and --tokenizer-model: the data it was trained on")
    if (args.data_prefix is None) != (args.tokenizer_model is None):
        p.error("--data-prefix and --tokenizer-model go together")
    return args


def load_data(args: argparse.Namespace, vocab_size: int) -> tuple[Data, str, int]:
    """The tokenized data (given, or made from the corpus), sliced to ``--max-tokens``; its description."""
    if args.data_prefix is not None:
        data, source = Data(args.data_prefix, args.tokenizer_model, vocab_size), args.data_prefix
    else:
        books = BOOKS if BOOKS.is_dir() and not args.quick else None
        corpus = args.corpus if args.corpus is not None else books
        data = prepare_data(corpus, args.workdir / "data", vocab_size, max_docs=600 if args.quick else 0)
        source = str(corpus or "embedded demo corpus")
    sliced, tokens = slice_data(data, args.max_tokens, args.workdir / "data")
    return sliced, source, tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Data, teacher, precomputes, students; the result the tables are made from."""
    base = QUICK if args.quick else FULL
    scale = dataclasses.replace(
        base,
        student_steps=args.steps or base.student_steps,
        teacher_steps=args.teacher_steps or base.teacher_steps,
    )
    load_start = load_text(os.getloadavg())
    data, source, tokens = load_data(args, scale.vocab_size)
    seeds = list(range(1, args.seeds + 1))
    bench = Bench(args.workdir, data, scale, seeds, Launcher(args.ranks, quiet=True))
    family = families(data, scale)[args.family]
    if args.family == "roberta":  # static masks: the precompute and every student mask the same tokens
        family = dataclasses.replace(family, extra=[*family.extra, "--data.mask_seed", str(args.mask_seed)])
    teacher = args.teacher if args.teacher is not None else bench.teacher(family)
    tau = args.temperature
    pre = [precompute(bench, family, teacher, k, "fp16", tau) for k in args.ks]
    if args.int8_k:
        pre.append(precompute(bench, family, teacher, args.int8_k, "int8", tau))
    targets = {p["k"]: p["path"] for p in pre if p["values"] == "fp16"}
    runs = train_students(bench, family, teacher, targets, tau, args.alpha0)
    students = student_rows(runs, scale.student_steps // 2)
    return {
        "corpus": source, "data_prefix": data.prefix, "tokens": tokens, "vocab_size": scale.vocab_size,
        "teacher": str(teacher), "family": args.family, "alpha0": args.alpha0,
        "mask_seed": args.mask_seed if args.family == "roberta" else None, "temperature": tau, "ranks": args.ranks, "scale": dataclasses.asdict(scale),
        "precompute": pre, "students": students, "offline_vs_online": offline_vs_online(students, args.ks),
        "overhead_goal_pct": OVERHEAD_GOAL_PCT, "wall_s": bench.wall,
        "load": {"start": load_start, "end": load_text(os.getloadavg())},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        result = run(args)
    except QuickstartError as e:
        print(f"bench_offline_targets: {e}", file=sys.stderr)
        return 1
    result["wall_s"] = {"total": time.time() - started, **result["wall_s"]}
    print("\n" + markdown(result) + f"\n\nwhole benchmark: {result['wall_s']['total'] / 60:.1f} min")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
