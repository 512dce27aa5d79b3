"""Framework overhead: tokens/s of pretrain_ki.py under the real deepspeed launcher vs a plain PyTorch loop.

Goal (issue 6): pretrain_ki.py (1 CPU rank, ``DS_ACCELERATOR=cpu``, fp32, ZeRO 0, no teacher) is at most 10%
slower per token than a plain single-process loop over the same model: ``build_model`` from the same
parsed config, ``torch.optim.AdamW`` (foreach) with the config's LR, betas, eps and weight decay,
``F.cross_entropy``, ``clip_grad_norm_`` at ``optim.clip_grad``, the same batch shape, and windows of the
same preprocessed token file.

What each side times per step is the same span: fetching the batch, forward, loss, backward, clipping and
the optimizer step. pretrain_ki.py reports it as ``tokens_per_s`` in ``metrics.jsonl``; what it does
between steps (aggregating the loss records, writing the metrics line) is outside that span on both sides.
The first ``--skip`` steps of each run are excluded; the table shows the median over the remaining steps of
all ``--repeats`` runs (the two sides alternate, so machine load from other jobs hits both alike), and
the best step of each side: on a machine shared with other jobs the fastest step is the one least
disturbed by them, so "overhead % (best)" is the steadier estimate there.

The corpus is built in a work directory with the project's tools (``tools/build_demo_corpus.py``,
``train_tokenizer.py``, ``preprocess_data.py``): Python standard-library docstrings, a sentencepiece BPE
tokenizer of ``--vocab`` pieces.

    python benchmarks/bench_pretrain.py    # 4 layers, hidden 256, seq 128, batch 8, 20 steps, 2 runs each
    python benchmarks/bench_pretrain.py --steps 12 --skip 2 --repeats 1   # quicker

Prints a markdown table (and writes it as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import fmt, load_text, table, timed_train_steps, timing_run_args

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "launch" / "configs" / "models" / "tiny_gpt2.yaml"
COLUMNS = (
    "run",
    "tokens/s (median)",
    "step ms (median)",
    "per-run tokens/s",
    "steps timed",
    "overhead %",
    "goal <= %",
    "meets goal",
    "tokens/s (best step)",
    "overhead % (best)",
)
GOAL_PERCENT = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="micro = global batch (1 rank, no accumulation)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--skip", type=int, default=4, help="first steps of each run left out of the median")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    p.add_argument("--docs", type=int, default=3000, help="demo-corpus documents")
    p.add_argument("--vocab", type=int, default=4000, help="tokenizer (and model) vocabulary")
    p.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="OMP_NUM_THREADS, both sides"
    )
    p.add_argument("--workdir", default=None, help="kept and reused (corpus, tokenizer); default: a temp dir")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)  # internal: one plain run
    args = p.parse_args(argv)
    if args.steps <= args.skip:
        p.error(f"--steps ({args.steps}) must be larger than --skip ({args.skip})")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> float:
    """Run ``cmd`` with its output in ``log``; the wall seconds, or an error quoting the log's tail."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(
            f"bench_pretrain: {' '.join(cmd[:3])} ... exited {proc.returncode} (log {log}):\n{tail}"
        )
    return time.perf_counter() - start


def prepare_data(workdir: Path, docs: int, vocab: int) -> tuple[str, str]:
    """Demo corpus -> sentencepiece model -> MMIDIDX prefix, reused when already in ``workdir``."""
    corpus, sp_prefix, out_prefix = workdir / "corpus.jsonl", workdir / "sp", workdir / "demo"
    data_prefix = f"{out_prefix}_text_document"
    if not Path(data_prefix + ".idx").exists():
        py, tools = sys.executable, ROOT / "tools"
        _run(
            [py, str(tools / "build_demo_corpus.py"), "--output", str(corpus), "--max-docs", str(docs)],
            workdir / "corpus.log",
        )
        _run(
            [
                py,
                str(tools / "train_tokenizer.py"),
                "--input",
                str(corpus),
                "--model-prefix",
                str(sp_prefix),
                "--vocab-size",
                str(vocab),
                "--num-threads",
                "1",
            ],
            workdir / "tokenizer.log",
        )
        _run(
            [
                py,
                str(tools / "preprocess_data.py"),
                "--input",
                str(corpus),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                f"{sp_prefix}.model",
                "--append-eod",
                "--output-prefix",
                str(out_prefix),
                "--workers",
                "1",
            ],
            workdir / "preprocess.log",
        )
    return data_prefix, f"{sp_prefix}.model"


def config_argv(args: argparse.Namespace, data_prefix: str, sp_model: str, run_dir: Path) -> list[str]:
    """pretrain_ki.py's arguments; the plain loop parses the very same list to build its model."""
    return [
        "--config", str(BASE_CONFIG),
        "--model.num_layers", str(args.layers),
        "--model.hidden_size", str(args.hidden),
        "--model.num_attention_heads", str(args.heads),
        "--model.ffn_hidden_size", str(4 * args.hidden),
        "--model.max_position_embeddings", str(args.seq),
        "--model.vocab_size", str(args.vocab),
        "--data.data_path", data_prefix,
        "--data.split", "100,0,0",
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", sp_model,
        "--data.seq_length", str(args.seq),
        "--train.train_steps", str(args.steps),
        "--train.micro_batch_size", str(args.batch),
        "--train.global_batch_size", str(args.batch),
        "--train.precision", "fp32",
        *timing_run_args(run_dir),
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise RuntimeError(
            "bench_pretrain: the `deepspeed` launcher is not installed next to python or on PATH"
        )
    return found


def run_framework(cfg_argv: list[str], run_dir: Path, threads: int, skip: int) -> dict:
    """One pretrain_ki.py run under ``deepspeed --num_gpus 1`` on the CPU accelerator."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    cmd = [_deepspeed_executable(), "--num_gpus", "1", "--master_port", str(_free_port()),
           str(ROOT / "pretrain_ki.py"), *cfg_argv]  # fmt: skip
    wall = _run(cmd, run_dir.parent / f"{run_dir.name}.log", env=env)
    timed = timed_train_steps(run_dir, skip, "bench_pretrain")
    return {"tokens_per_s": [r["tokens_per_s"] for r in timed], "wall_s": wall}


def plain_loop(cfg_argv: list[str], skip: int) -> dict:
    """The reference: a plain PyTorch loop over the same model, batch shape and token file (no DeepSpeed)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from megatron_ki.config import parse_args as parse_config
    from megatron_ki.data import IndexedDataset
    from megatron_ki.models import build_model

    cfg = parse_config(cfg_argv)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, seed=cfg.train.seed).train()
    optim = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=optim.lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_eps,
        weight_decay=optim.weight_decay,
        foreach=True,
    )
    data = IndexedDataset(cfg.data.data_path[-1])
    tokens = np.concatenate([np.asarray(data[i], dtype=np.int64) for i in range(len(data))])
    seq, batch = cfg.data.seq_length, cfg.train.micro_batch_size
    if len(tokens) <= seq + 1:
        raise RuntimeError(
            f"bench_pretrain: {cfg.data.data_path[-1]} has {len(tokens)} tokens, need > {seq + 1}"
        )
    rng = np.random.default_rng(cfg.data.seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, len(tokens) - seq - 1, batch)
        window = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]))
        return window[:, :-1], window[:, 1:]

    rates = []
    for step in range(1, cfg.train.train_steps + 1):
        start = time.perf_counter()
        ids, labels = next_batch()
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        opt.step()
        loss_value = float(loss)
        elapsed = time.perf_counter() - start
        if step > skip:
            rates.append(batch * seq / elapsed)
    return {"tokens_per_s": rates, "final_loss": loss_value, "threads": torch.get_num_threads()}


def run_plain(cfg_argv: list[str], workdir: Path, threads: int, skip: int, index: int) -> dict:
    """:func:`plain_loop` in a fresh process with the same thread count as the framework's rank."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = workdir / f"plain{index}.json"
    child = json.dumps({"argv": cfg_argv, "skip": skip, "out": str(out)})
    wall = _run([sys.executable, __file__, "--plain-child", child], workdir / f"plain{index}.log", env=env)
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = wall
    return result


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    load_at_start = os.getloadavg()
    data_prefix, sp_model = prepare_data(workdir, args.docs, args.vocab)
    plain_runs, framework_runs = [], []
    for i in range(args.repeats):
        run_dir = workdir / f"framework{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg_argv = config_argv(args, data_prefix, sp_model, run_dir)
        plain_runs.append(run_plain(cfg_argv, workdir, args.threads, args.skip, i))
        framework_runs.append(run_framework(cfg_argv, run_dir, args.threads, args.skip))

    def row(name: str, runs: list[dict], baseline: dict | None) -> dict:
        pooled = [x for r in runs for x in r["tokens_per_s"]]
        tps, best = statistics.median(pooled), max(pooled)
        overhead = None if baseline is None else 100.0 * (baseline["tokens/s (median)"] / tps - 1.0)
        return {
            "run": name,
            "tokens/s (median)": tps,
            "step ms (median)": 1e3 * args.batch * args.seq / tps,
            "per-run tokens/s": " / ".join(f"{statistics.median(r['tokens_per_s']):.0f}" for r in runs),
            "steps timed": len(pooled),
            "overhead %": overhead,
            "goal <= %": None if baseline is None else GOAL_PERCENT,
            "meets goal": None if overhead is None else overhead <= GOAL_PERCENT,
            "tokens/s (best step)": best,
            "overhead % (best)": None
            if baseline is None
            else 100.0 * (baseline["tokens/s (best step)"] / best - 1.0),
            "process wall s": [round(r["wall_s"], 1) for r in runs],
        }

    plain = row("plain PyTorch loop", plain_runs, None)
    framework = row("pretrain_ki.py (deepspeed, 1 CPU rank)", framework_runs, plain)
    return {
        "model": f"gpt2 {args.layers} layers, hidden {args.hidden}, heads {args.heads}, vocab {args.vocab}",
        "shape": f"batch {args.batch} x seq {args.seq}, {args.steps} steps (first {args.skip} skipped)",
        "threads": args.threads,
        "load_average_start": load_at_start,
        "load_average": os.getloadavg(),
        "rows": [plain, framework],
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']}; {result['shape']}; fp32, {result['threads']} threads; "
        f"load average (1/5/15 min) at start {load_text(result['load_average_start'])}, "
        f"at end {load_text(result['load_average'])}",
        "",
    ]
    lines += table(COLUMNS, ([fmt(row[c]) for c in COLUMNS] for row in result["rows"]))
    walls = "; ".join(f"{r['run']}: {r['process wall s']}" for r in result["rows"])
    lines += ["", f"process wall seconds per run (start-up included): {walls}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plain_child:
        spec = json.loads(args.plain_child)
        result = plain_loop(spec["argv"], spec["skip"])
        Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
        return 0
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, workdir.resolve())
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
