#!/usr/bin/env python
"""The KI quickstart: corpus -> tokenizer -> indexed data -> teacher -> student from scratch, with KI, and grown
from the teacher with KI -> report.

    python tools/quickstart.py                       # the embedded corpus (Python's standard library docs)
    python tools/quickstart.py --corpus ../shared/data/books/train

Every training run goes through ``launch/pretrain_ki.sh`` (the ``deepspeed`` launcher; on a machine without
GPUs DeepSpeed's CPU accelerator with gloo) with 2 ranks; the student runs on two pipeline stages with the
teacher inside them. The teacher (GPT-2-style, 2 layers, hidden 128, 2 heads of 64) is trained first for 150
steps; the student (4 layers, hidden 256, 4 heads of 64: 4.6x the teacher's FLOPs per token) is trained three
times for 300 steps on the same data order: from scratch; with Knowledge Inheritance (KD weight a_t decaying
linearly from 1 to 0 over the first half of its steps, temperature 1); and grown from the teacher
(``tools/grow_checkpoint.py``: the teacher's function in the student's shape, ``--checkpoint.init_from``) with
KI (a_t from 0.5 to 0 over the first quarter). This is the paper's regime: the scratch student ends well below
its smaller teacher, and the question is how much sooner the inheriting students get there. The design and
what other settings gave are in benchmarks/RESULTS.md ("KI quickstart"). At the end it prints the KI report
(tools/ki_report.py) and the arms report, and writes ``<work>/ki_report.{md,png}`` and
``<work>/arms_report.{md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.errors import MegatronKIError, add_debug_argument, run_main
from megatron_ki.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
PROG = "quickstart.py"

CONFIGS = ROOT / "launch" / "configs" / "quickstart"


class QuickstartError(MegatronKIError, RuntimeError):
    """A step failed; the message says which and how."""


@dataclass(frozen=True)
class Data:
    """A preprocessed corpus: the MMIDIDX ``prefix`` and the sentencepiece ``tokenizer`` model."""

    prefix: str
    tokenizer: str
    vocab_size: int

    def args(self) -> list[str]:
        """pretrain_ki.py overrides that point a run at this corpus."""
        return [
            "--data.data_path", self.prefix,
            "--data.tokenizer_model", self.tokenizer,
            "--model.vocab_size", str(self.vocab_size),
        ]  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    cmd: list[str], what: str, env: dict[str, str] | None = None, quiet: bool = False, cwd: Path = ROOT
) -> float:
    """Run ``cmd`` from the repository root; seconds taken. A failure raises QuickstartError naming the step."""
    print(f"\n==> {what}\n    {' '.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
    )
    if result.returncode != 0:
        if quiet and result.stdout:  # the step's own output first: its error line says what went wrong
            print(result.stdout[-3000:], file=sys.stderr, end="" if result.stdout.endswith("\n") else "\n")
        raise QuickstartError(
            f"step '{what}' failed with exit code {result.returncode} (its output is above)"
        )
    seconds = time.time() - start
    print(f"    done in {seconds:.0f} s", flush=True)
    return seconds


def corpus_inputs(corpus: Path) -> list[str]:
    """The user's corpus as a list of files (``.txt``/``.jsonl``/``.jsonl.gz``)."""
    if corpus.is_dir():
        files = sorted(
            str(p)
            for p in corpus.rglob("*")
            if p.suffix in (".txt", ".jsonl") or p.name.endswith(".jsonl.gz")
        )
        if not files:
            raise QuickstartError(f"{corpus} holds no .txt or .jsonl files")
        return files
    if corpus.is_file():
        return [str(corpus)]
    raise QuickstartError(f"corpus not found: {corpus}")


def to_jsonl(files: list[str], out: Path, chunk_chars: int) -> Path:
    """Plain-text files become JSON lines of about ``chunk_chars`` characters, split at blank lines."""
    with atomic_write(out) as f:
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


def prepare_data(
    corpus: Path | None, work: Path, vocab_size: int, python: str = sys.executable, max_docs: int = 0
) -> Data:
    """Corpus (the embedded one when ``corpus`` is None) -> sentencepiece BPE -> ``<work>/corpus_text_document``."""
    work.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        jsonl = work / "demo.jsonl"
        build = [python, "tools/build_demo_corpus.py", "--output", str(jsonl)]
        run(build + (["--max-docs", str(max_docs)] if max_docs else []), "build the embedded demo corpus")
        inputs = [str(jsonl)]
    else:
        inputs = corpus_inputs(corpus)
        if any(f.endswith(".txt") for f in inputs):
            txt = to_jsonl(inputs, work / "corpus.jsonl", 4000)
            inputs = [str(txt)] + [f for f in inputs if not f.endswith(".txt")]
    tokenizer = work / "tokenizer"
    train_tok = [python, "tools/train_tokenizer.py", "--input", *inputs, "--model-prefix", str(tokenizer)]
    train_tok += ["--vocab-size", str(vocab_size), "--sample-size", "200000"]
    run(train_tok, "train a sentencepiece tokenizer", quiet=True)
    prefix = work / "corpus"
    preprocess = [python, "tools/preprocess_data.py", "--input", *inputs, "--output-prefix", str(prefix)]
    preprocess += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", f"{tokenizer}.model"]
    run([*preprocess, "--append-eod", "--workers", "2"], "tokenize into Megatron .bin/.idx", quiet=True)
    return Data(f"{prefix}_text_document", f"{tokenizer}.model", vocab_size)


@dataclass
class Launcher:
    """Runs ``pretrain_ki.py`` through ``launch/pretrain_ki.sh`` with ``ranks`` CPU (or GPU) ranks."""

    ranks: int = 2
    python: str = sys.executable
    quiet: bool = False
    repo: Path = ROOT
    """Checkout whose launch/pretrain_ki.sh (and so pretrain_ki.py) runs."""

    def env(self) -> dict[str, str]:
        # The virtualenv's own deepspeed launcher, whether or not the venv is activated; a free rendezvous port
        # unless MASTER_PORT is set, so two jobs on one machine do not collide on DeepSpeed's default 29500.
        bin_dir = str(Path(self.python).parent)
        return {
            "CPU_RANKS": str(self.ranks),
            "PYTHON": self.python,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
        }

    def train(self, config: Path, overrides: list[str], run_dir: Path, what: str) -> float:
        """One training run logging to ``run_dir``; seconds taken (start-up included)."""
        cmd = ["bash", str(self.repo / "launch" / "pretrain_ki.sh"), "--config", str(config), *overrides]
        cmd += ["--logging.run_dir", str(run_dir)]
        if self.quiet:
            cmd += ["--logging.progress_bar", "false"]
        return run(cmd, what, self.env(), quiet=self.quiet, cwd=self.repo)


def main(argv: list[str] | None = None) -> int:
    """A failed step is one line on stderr (after the step's own output) and exit code 1."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", type=Path, help="directory or file of .txt/.jsonl (default: embedded corpus)"
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument(
        "--ki-steps", type=int, default=None, help="T_ki: steps of linear decay of a_t to 0 (default: half)"
    )
    parser.add_argument(
        "--grown-ki-steps", type=int, default=None, help="T_ki of the grown student (default: a quarter)"
    )
    parser.add_argument("--grown-alpha0", type=float, default=0.5, help="a_0 of the grown student's KI")
    parser.add_argument("--no-grown", action="store_true", help="skip the grown + KI arm")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--ranks", type=int, default=2)
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    ki_steps = args.ki_steps if args.ki_steps is not None else args.student_steps // 2

    work = args.work_dir.resolve()
    started = time.time()
    data = prepare_data(args.corpus, work, args.vocab_size)
    launcher = Launcher(args.ranks)
    steps = ["--train.train_steps"]
    teacher_ckpt = work / "teacher_ckpt"
    launcher.train(
        CONFIGS / "teacher.yaml",
        [*data.args(), *steps, str(args.teacher_steps), "--checkpoint.save", str(teacher_ckpt)],
        work / "teacher",
        f"train the teacher ({args.teacher_steps} steps)",
    )
    student = [*data.args(), *steps, str(args.student_steps)]
    ki = [
        "--ki.enabled",
        "true",
        "--ki.teacher_path",
        str(teacher_ckpt),
        "--ki.decay_steps",
        str(ki_steps),
    ]
    launcher.train(
        CONFIGS / "student.yaml",
        student + ki,
        work / "student_ki",
        f"train the student with KI (teacher inside the pipeline stages, a_t 1 -> 0 over {ki_steps} steps)",
    )
    launcher.train(
        CONFIGS / "student.yaml", student, work / "student_scratch", "train the student from scratch"
    )
    arms = {"KI": work / "student_ki"}
    if not args.no_grown:
        grown_ckpt = work / "grown_ckpt"
        if grown_ckpt.exists():
            shutil.rmtree(grown_ckpt)  # a rerun grows the new teacher
        grow = [sys.executable, "tools/grow_checkpoint.py", "--load", str(teacher_ckpt)]
        grow += ["--config", str(CONFIGS / "student.yaml"), "--save", str(grown_ckpt), *data.args()]
        run(
            grow,
            "grow the teacher into the student's shape (the same function, 2x wide and deep)",
            quiet=True,
        )
        grown_steps = args.grown_ki_steps if args.grown_ki_steps is not None else args.student_steps // 4
        grown_ki = [*ki[:-1], str(grown_steps), "--ki.alpha0", str(args.grown_alpha0)]
        launcher.train(
            CONFIGS / "student.yaml",
            [*student, *grown_ki, "--checkpoint.init_from", str(grown_ckpt)],
            work / "student_grown_ki",
            f"train the grown student with KI (a_t {args.grown_alpha0} -> 0 over {grown_steps} steps)",
        )
        arms["grown + KI"] = work / "student_grown_ki"

    from megatron_ki.training.arms_report import build_arms_report, write_arms_report
    from megatron_ki.training.report import build_ki_report, write_ki_report

    report = build_ki_report(work / "student_ki", work / "student_scratch", work / "teacher")
    md, png = write_ki_report(report, work)
    arms_report = build_arms_report(arms, work / "student_scratch", work / "teacher")
    arms_md, arms_png = write_arms_report(arms_report, work)
    print("\n" + report.markdown())
    print("\n" + arms_report.markdown())
    print(f"\nreports: {md}, {arms_md}\ncurves: {png}, {arms_png}")
    print(f"quickstart took {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
