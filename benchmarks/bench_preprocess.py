#!/usr/bin/env python
"""Throughput and peak memory of tools/preprocess_data.py.

Builds a ``.jsonl`` corpus from a folder of ``.txt`` books (one document per group of paragraphs of about
``--doc-chars`` characters), trains a sentencepiece tokenizer on it (unless ``--tokenizer-model`` is given),
then runs the tool in fresh processes:

* tokens/s with 1 and 2 workers on the corpus (goal: 2 workers >= 1.7x one worker);
* peak RSS of the whole process tree (main + workers, sampled every 20 ms) for the corpus and for the corpus
  repeated ``--repeat`` times (goal: within 1.2x: memory must not grow with the input).

Example::

    python benchmarks/bench_preprocess.py --books ../shared/data/books/train
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def books_to_jsonl(books_dir: str, out: str, doc_chars: int) -> tuple[int, int]:
    files = sorted(f for f in os.listdir(books_dir) if f.endswith(".txt"))
    if not files:
        raise SystemExit(f"error: no .txt files in {books_dir}")
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for name in files:
            with open(os.path.join(books_dir, name), encoding="utf-8") as src:
                text = src.read()
            paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
            buf: list[str] = []
            size = 0
            for p in paras:
                buf.append(p)
                size += len(p)
                if size >= doc_chars:
                    f.write(json.dumps({"text": "\n\n".join(buf)}) + "\n")
                    n += 1
                    buf, size = [], 0
            if buf:
                f.write(json.dumps({"text": "\n\n".join(buf)}) + "\n")
                n += 1
    return n, os.path.getsize(out)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run_tool(jsonl: str, model: str, out_prefix: str, workers: int) -> dict:
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools/preprocess_data.py"),
        "--input",
        jsonl,
        "--output-prefix",
        out_prefix,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--append-eod",
        "--workers",
        str(workers),
        "--log-interval",
        "0",
    ]
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed ({proc.returncode}):\n{err[-2000:]}")
    m = re.search(r"tokens: (\d+).*time: ([\d.]+) s", out)
    assert m, out
    tokens, tool_time = int(m.group(1)), float(m.group(2))
    return {
        "workers": workers,
        "tokens": tokens,
        "tool_s": tool_time,
        "wall_s": wall,
        "tokens_per_s": tokens / tool_time,
        "peak_rss_mb": peak / 2**20,
        "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--books",
        default=os.path.join(ROOT, "..", "shared", "data", "books", "train"),
        help="folder of .txt books (ignored with --jsonl)",
    )
    p.add_argument("--jsonl", help="use this .jsonl corpus instead of building one from --books")
    p.add_argument("--tokenizer-model", help="sentencepiece model; default: train one on the corpus")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--doc-chars", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    return p.parse_args()


def prepare_inputs(args: argparse.Namespace, work: str) -> tuple[str, str, str]:
    """The corpus (``--jsonl`` or built from ``--books``), the tokenizer model (trained unless given) and
    the corpus repeated ``--repeat`` times."""
    corpus = args.jsonl
    if corpus is None:
        corpus = os.path.join(work, "books.jsonl")
        n_docs, size = books_to_jsonl(args.books, corpus, args.doc_chars)
        print(f"corpus: {n_docs} documents, {size / 1e6:.1f} MB from {args.books}")
    model = args.tokenizer_model
    if model is None:
        from megatron_ki.data.train_tokenizer import train_sentencepiece

        t0 = time.perf_counter()
        model = train_sentencepiece(
            corpus,
            os.path.join(work, "tok"),
            args.vocab_size,
            sample_size=200_000,
            special_tokens=["<mask>", "<pad>", "<eod>"],
            num_threads=os.cpu_count() or 1,
        )
        print(f"trained sentencepiece bpe {args.vocab_size} in {time.perf_counter() - t0:.1f} s")
    big = os.path.join(work, f"books_x{args.repeat}.jsonl")
    with open(big, "wb") as f:
        for _ in range(args.repeat):
            with open(corpus, "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
    return corpus, model, big


def measure_rows(args: argparse.Namespace, corpus: str, big: str, model: str, work: str) -> list[dict]:
    """The tool on the corpus and on the repeated corpus, with 1 and 2 workers each; prints each row's JSON."""
    rows = []
    for label, path, workers in (
        ("1x", corpus, 1),
        ("1x", corpus, 2),
        (f"{args.repeat}x", big, 1),
        (f"{args.repeat}x", big, 2),
    ):
        r = run_tool(path, model, os.path.join(work, f"out_{label}_{workers}"), workers)
        r["corpus"] = label
        r["mb"] = os.path.getsize(path) / 1e6
        rows.append(r)
        print(json.dumps(r))
    return rows


def print_report(args: argparse.Namespace, rows: list[dict]) -> None:
    """The markdown table of the rows, then the speedup, memory-growth and efficiency ratios and goals."""
    print(
        "\n| corpus | MB | workers | tokens | time (s) | tokens/s | CPU s (all processes) | tokens/CPU-s |"
        " peak RSS, process tree (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['corpus']} | {r['mb']:.1f} | {r['workers']} | {r['tokens']:,} | {r['tool_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['cpu_s']:.1f} | {r['tokens_per_cpu_s']:,.0f} | {r['peak_rss_mb']:.0f} |"
        )
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    speedup_big = rows[3]["tokens_per_s"] / rows[2]["tokens_per_s"]
    rss_ratio = [rows[k + 2]["peak_rss_mb"] / rows[k]["peak_rss_mb"] for k in (0, 1)]
    print(
        f"\n2 workers / 1 worker tokens/s: {speedup:.2f}x (1x corpus), {speedup_big:.2f}x ({args.repeat}x corpus);"
        f" goal >= 1.7x"
    )
    print(
        f"peak RSS {args.repeat}x / 1x: {rss_ratio[0]:.2f} (1 worker), {rss_ratio[1]:.2f} (2 workers); goal <= 1.2"
    )
    eff = rows[1]["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"]
    print(
        f"tokens per CPU-second, 2 workers / 1 worker: {eff:.2f} (parallel overhead; the wall-clock speedup on"
        f" 2 free cores is bounded by 2 x this)"
    )
    print(f"cpu count: {os.cpu_count()}, load average before: {os.getloadavg()}")


def main() -> int:
    args = parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    corpus, model, big = prepare_inputs(args, work)
    rows = measure_rows(args, corpus, big, model, work)
    print_report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
