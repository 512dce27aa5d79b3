"""Shared pieces of the launcher tests: a tiny deterministic corpus, its tokenizer and preprocessed prefix,
a KI teacher checkpoint, and a helper that runs ``pretrain_ki.py`` under the real ``deepspeed`` launcher.

The corpus is synthetic (seeded word salad with a few repeated phrases, so the loss moves) rather than the
demo corpus: it is built in about a second, needs no ``../shared`` data, and its bytes do not depend on the
Python version, so the golden loss values in ``tests/golden`` stay valid on any machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "pretrain_ki.py"
CONFIGS = ROOT / "launch" / "configs" / "models"
VOCAB_SIZE = 512
SEQ_LENGTH = 32
NUM_DOCUMENTS = 240


def deepspeed_bin() -> str:
    """The ``deepspeed`` launcher beside the running interpreter (the test's virtualenv)."""
    candidate = Path(sys.executable).parent / "deepspeed"
    return str(candidate) if candidate.is_file() else "deepspeed"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ corpus
def synthetic_documents(n: int = NUM_DOCUMENTS, seed: int = 0) -> list[str]:
    """Deterministic English-like documents: a fixed made-up vocabulary, Zipf-ish word choice, and
    recurring templates so a model can learn something in a few steps."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fi", "gu", "he", "ju"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    weights = [1.0 / (i + 1) for i in range(len(words))]
    templates = [
        "the {} of the {} is {} .",
        "a {} walks to the {} and {} the {} .",
        "when the {} sings , every {} {} .",
        "{} , {} and {} are friends of the {} .",
    ]
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(4, 12)):
            t = rng.choice(templates)
            sentences.append(t.format(*rng.choices(words, weights, k=t.count("{}"))))
        docs.append(" ".join(sentences))
    return docs


@dataclass(frozen=True)
class Corpus:
    """A preprocessed corpus: ``prefix`` (``{prefix}.bin/.idx``) and the sentencepiece ``tokenizer`` model."""

    root: Path
    prefix: str
    tokenizer: str

    def data_args(self, cache_dir: str | Path) -> list[str]:
        """Overrides pointing pretrain_ki.py at this corpus (the index cache in ``cache_dir``)."""
        return [
            "--data.data_path", self.prefix,
            "--data.tokenizer_type", "SentencePieceTokenizer",
            "--data.tokenizer_model", self.tokenizer,
            "--data.seq_length", str(SEQ_LENGTH),
            "--data.split", "90,8,2",
            "--data.cache_dir", str(cache_dir),
        ]  # fmt: skip


def build_corpus(root: str | Path) -> Corpus:
    """Write the synthetic corpus, train a 512-piece BPE tokenizer on it and preprocess it, under ``root``."""
    from megatron_ki.data.preprocess import main as preprocess_main
    from megatron_ki.data.train_tokenizer import train_sentencepiece

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in synthetic_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    model = train_sentencepiece(
        str(jsonl),
        str(root / "sp"),
        VOCAB_SIZE,
        model_type="bpe",
        special_tokens=["<mask>", "<pad>", "<eod>"],
        sample_size=0,
        num_threads=1,
    )
    rc = preprocess_main(
        [
            "--input", str(jsonl),
            "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", model,
            "--append-eod",
            "--eod-token", "<eod>",  # id 5, the separator the golden loss curves were recorded with
            "--output-prefix", str(root / "synth"),
            "--log-interval", "1000000",
        ]
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"tools/preprocess_data.py failed with exit code {rc} on {jsonl}")
    return Corpus(root, str(root / "synth_text_document"), model)


# ----------------------------------------------------------------------------------------- teacher
TEACHER_OVERRIDES = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64}


def write_teacher(
    root: str | Path, family_config: str, seed: int = 7, overrides: dict[str, Any] | None = None
) -> Path:
    """A seeded (untrained) teacher, smaller than the tiny student, as a weights-only framework checkpoint.

    Parity tests need a fixed teacher, not a good one; writing it costs no launch. ``overrides`` are model
    fields the student also overrides (e.g. the padding id), so the two share the tokenizer.
    """
    from megatron_ki.config import Config, model_config_from_yaml
    from megatron_ki.convert.reshard import write_checkpoint
    from megatron_ki.models import build_model

    student = model_config_from_yaml(CONFIGS / family_config)
    fields = {**student.__dict__, **TEACHER_OVERRIDES, "vocab_size": VOCAB_SIZE, **(overrides or {})}
    teacher_cfg = type(student)(**fields)
    model = build_model(teacher_cfg, seed=seed)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    root = Path(root)
    write_checkpoint(full, Config(model=teacher_cfg), root, tp=1, pp=1, tag="teacher")
    return root


# ------------------------------------------------------------------------------------------ launch
@dataclass
class RunResult:
    returncode: int
    output: str
    seconds: float
    run_dir: Path

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)

    def losses(self, key: str = "loss") -> list[float]:
        """Per-step training values of ``key``, in step order."""
        return [m[key] for m in self.metrics() if "split" not in m]

    def steps(self) -> list[int]:
        return [m["step"] for m in self.metrics() if "split" not in m]

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def quiet_args(run_dir: str | Path) -> list[str]:
    """Overrides every test run shares: logs in ``run_dir``, no TensorBoard/progress bar, one eval batch."""
    return [
        "--logging.run_dir", str(run_dir),
        "--logging.tensorboard", "false",
        "--logging.progress_bar", "false",
        "--train.eval_interval", "0",
        "--train.eval_iters", "1",
        "--train.collective_timeout_s", "60",
    ]  # fmt: skip


def launch(
    world_size: int,
    args: list[str],
    run_dir: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
    script: list[str] | None = None,
    entry: Path = ENTRY,
) -> RunResult:
    """Run ``deepspeed --num_gpus world_size pretrain_ki.py ARGS`` on the CPU accelerator (gloo).

    ``script`` replaces the launcher command (e.g. ``["bash", "launch/pretrain_ki.sh"]``, which then gets
    the rank count through ``CPU_RANKS``); ``entry`` replaces pretrain_ki.py (e.g. ``tests/fault_entry.py``).
    Output is captured; a run past ``timeout`` is killed and reported.
    """
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(free_port()),
        **(env or {}),
    }
    if script is None:
        cmd = [deepspeed_bin(), "--num_gpus", str(world_size), "--master_port", full_env["MASTER_PORT"]]
        cmd += [str(entry), *args]
    else:
        full_env["CPU_RANKS"] = str(world_size)
        full_env.setdefault("DEEPSPEED", deepspeed_bin())
        cmd = [*script, *args]
    start = time.perf_counter()
    # Own session, so a launch past its timeout is killed with every rank it started.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc, out = -9, (out or "") + f"\n[test] launch killed after {timeout} s"
    return RunResult(rc, out, time.perf_counter() - start, Path(run_dir))


# --------------------------------------------------------------------------------------- scheduling
class LaunchQueue:
    """Runs launches on ``workers`` threads, most urgent first (then in submission order).

    Tests queue the launches they will need early, so two are always in flight (one launch leaves a core
    idle most of its time), and submit launches that wait on another's output as urgent, so they do not
    queue behind the prefetched ones. :meth:`close` drops what never started and waits for the rest.
    """

    def __init__(self, workers: int = 2):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any], urgent: bool = False) -> Future:
        future: Future = Future()
        self._queue.put((0 if urgent else 1, next(self._seq), fn, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                return
            if self._closing.is_set() or not future.set_running_or_notify_cancel():
                future.cancel()
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

    def close(self) -> None:
        self._closing.set()
        for _ in self._threads:
            self._queue.put((-1, next(self._seq), None, None))
        for t in self._threads:
            t.join()
