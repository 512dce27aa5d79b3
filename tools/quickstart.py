#!/usr/bin/env python
"""The KI quickstart: corpus -> tokenizer -> indexed data -> teacher -> student with KI and from scratch.

    python tools/quickstart.py                       # the embedded corpus (Python's standard library docs)
    python tools/quickstart.py --corpus ../shared/data/books/train

Every training run goes through ``launch/pretrain_ki.sh`` (the ``deepspeed`` launcher; on a machine without
GPUs DeepSpeed's CPU accelerator with gloo) with 2 ranks and two pipeline stages for the student, the teacher
inside the student's stages. At the end it prints validation loss at fixed steps, the steps each student needs
to reach the scratch run's final loss, and writes the loss curves to ``<work>/ki_vs_scratch.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    print(f"\n==> {what}\n    {' '.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"quickstart: '{what}' failed with exit code {result.returncode}")
    print(f"    done in {time.time() - start:.0f} s", flush=True)


def corpus_inputs(corpus: Path, work: Path) -> list[str]:
    """The user's corpus as a list of files (``.txt``/``.jsonl``); the embedded one is built if none is given."""
    if corpus.is_dir():
        files = sorted(
            str(p)
            for p in corpus.rglob("*")
            if p.suffix in (".txt", ".jsonl") or p.name.endswith(".jsonl.gz")
        )
        if not files:
            sys.exit(f"quickstart: {corpus} holds no .txt or .jsonl files")
        return files
    if corpus.is_file():
        return [str(corpus)]
    sys.exit(f"quickstart: corpus not found: {corpus}")


def to_jsonl(files: list[str], out: Path, chunk_chars: int) -> Path:
    """Plain-text files become JSON lines of about ``chunk_chars`` characters, split at blank lines."""
    import json

    with open(out, "w", encoding="utf-8") as f:
        for path in files:
            if not path.endswith(".txt"):
                continue
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            buf: list[str] = []
            size = 0
            for para in text.split("\n\n"):
                buf.append(para)
                size += len(para)
                if size >= chunk_chars:
                    f.write(json.dumps({"text": "\n\n".join(buf)}) + "\n")
                    buf, size = [], 0
            if buf:
                f.write(json.dumps({"text": "\n\n".join(buf)}) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", type=Path, help="directory or file of .txt/.jsonl (default: embedded corpus)"
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--ki-steps", type=int, default=200, help="T_ki: steps of linear decay of alpha to 0")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    launcher = ["bash", str(ROOT / "launch" / "pretrain_ki.sh")]
    # The virtualenv's own launcher, whether or not the venv is activated.
    bin_dir = str(Path(py).parent)
    env = {
        "CPU_RANKS": str(args.ranks),
        "PYTHON": py,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }

    # 1. Corpus, tokenizer, indexed dataset.
    if args.corpus is None:
        corpus = work / "demo.jsonl"
        run([py, "tools/build_demo_corpus.py", "--output", str(corpus)], "build the embedded demo corpus")
        inputs = [str(corpus)]
    else:
        inputs = corpus_inputs(args.corpus, work)
        if any(f.endswith(".txt") for f in inputs):
            inputs = [str(to_jsonl(inputs, work / "corpus.jsonl", 4000))] + [
                f for f in inputs if not f.endswith(".txt")
            ]
    run(
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            *inputs,
            "--model-prefix",
            str(work / "tokenizer"),
            "--vocab-size",
            str(args.vocab_size),
            "--sample-size",
            "200000",
        ],
        "train a sentencepiece tokenizer",
    )
    prefix = work / "corpus"
    run(
        [
            py,
            "tools/preprocess_data.py",
            "--input",
            *inputs,
            "--output-prefix",
            str(prefix),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(work / "tokenizer.model"),
            "--append-eod",
            "--workers",
            "2",
        ],
        "tokenize into Megatron .bin/.idx",
    )
    data = [
        "--data.data_path",
        f"{prefix}_text_document",
        "--data.tokenizer_model",
        str(work / "tokenizer.model"),
        "--model.vocab_size",
        str(args.vocab_size),
    ]

    # 2. The teacher (small), trained from scratch and saved.
    teacher_ckpt = work / "teacher_ckpt"
    run(
        [
            *launcher,
            "--config",
            "launch/configs/quickstart/teacher.yaml",
            *data,
            "--train.train_steps",
            str(args.teacher_steps),
            "--logging.run_dir",
            str(work / "teacher"),
            "--checkpoint.save",
            str(teacher_ckpt),
        ],
        f"train the teacher ({args.teacher_steps} steps)",
        env,
    )

    # 3. The student twice: with Knowledge Inheritance and from scratch.
    common = [
        "--config",
        "launch/configs/quickstart/student.yaml",
        *data,
        "--train.train_steps",
        str(args.student_steps),
    ]
    run(
        launcher
        + common
        + [
            "--ki.enabled",
            "true",
            "--ki.teacher_path",
            str(teacher_ckpt),
            "--ki.decay_steps",
            str(args.ki_steps),
            "--logging.run_dir",
            str(work / "student_ki"),
        ],
        f"train the student with KI (teacher inside the pipeline stages, alpha 1 -> 0 over {args.ki_steps} steps)",
        env,
    )
    run(
        launcher + common + ["--logging.run_dir", str(work / "student_scratch")],
        "train the student from scratch",
        env,
    )

    # 4. Compare.
    from plot_runs import format_table, load_run, plot, summarize  # tools/plot_runs.py

    runs = [
        load_run(work / "student_ki", label="ki"),
        load_run(work / "student_scratch", label="scratch"),
        load_run(work / "teacher", label="teacher"),
    ]
    print("\nValidation LM loss at fixed steps:")
    steps = sorted({s for r in runs[:2] for s in r.steps})
    print("| step | " + " | ".join(r.label for r in runs) + " |")
    print("|---:|" + "---:|" * len(runs))
    for s in steps:
        cells = []
        for r in runs:
            value = dict(zip(r.steps, r.values)).get(s)
            cells.append(f"{value:.4f}" if value is not None else "")
        print(f"| {s} | " + " | ".join(cells) + " |")
    target, ref, rows = summarize(runs[:2])  # the reference is the run labelled "scratch"
    print("\nSteps (and FLOPs) to reach the scratch run's final validation loss:")
    print(format_table(runs[:2], target, ref, rows))
    png = plot(runs, work / "ki_vs_scratch.png", target=target)
    print(f"\nloss curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
