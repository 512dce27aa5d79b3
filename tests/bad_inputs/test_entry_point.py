"""Bad inputs to the training entry point and its launcher script: one line naming the option or file, the
documented exit code (2 configuration or command line, 1 other expected failures), no traceback.

Most cases run ``pretrain_ki.py`` as one rank without the launcher (what the launcher starts, minus ~5 s of
its start-up); two go through ``launch/pretrain_ki.sh`` with 2 ranks to show that a failure every rank sees
is printed once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.harness import PYTHON, ROOT, BadInput, check, run_all, single_rank_env
from tests.training_utils import CONFIGS, build_corpus, deepspeed_bin

pytestmark = pytest.mark.distributed  # each case starts pretrain_ki.py (DeepSpeed, a process group)

ENTRY = str(ROOT / "pretrain_ki.py")
SCRIPT = str(ROOT / "launch" / "pretrain_ki.sh")
PREFIX = "pretrain_ki.py: error:"
CORPUS: dict[str, Path] = {}


def base(folder: Path, *extra: str, data: str | None = None, tokenizer: str | None = None) -> list[str]:
    """The tiny GPT on the synthetic corpus, 2 steps; ``data``/``tokenizer`` replace the corpus' files."""
    return [
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--train.train_steps", "2",
        "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2",
        "--model.vocab_size", "512",
        "--data.data_path", data or str(CORPUS["prefix"]),
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", tokenizer or str(CORPUS["tokenizer"]),
        "--data.seq_length", "32",
        "--data.split", "90,8,2",
        "--data.cache_dir", str(folder / "cache"),
        "--logging.run_dir", str(folder / "run"),
        "--logging.tensorboard", "false",
        "--logging.progress_bar", "false",
        "--train.eval_interval", "0",
        "--train.eval_iters", "1",
        *extra,
    ]  # fmt: skip


def entry(*extra: str, **kw) -> object:
    return lambda folder: [PYTHON, ENTRY, *base(folder, *extra, **kw)]


def copy_corpus(folder: Path) -> str:
    """A private copy of the corpus' .bin/.idx, to damage; returns its prefix."""
    prefix = folder / "data" / "copy_text_document"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copy(str(CORPUS["prefix"]) + ext, str(prefix) + ext)
    return str(prefix)


def truncated(ext: str, keep: int):
    def setup(folder: Path) -> list[str]:
        prefix = copy_corpus(folder)
        path = Path(prefix + ext)
        path.write_bytes(path.read_bytes()[:keep])
        return [PYTHON, ENTRY, *base(folder, data=prefix)]

    return setup


def bad_yaml(folder: Path) -> list[str]:
    cfg = folder / "run.yaml"
    cfg.write_text("train:\n  train_steps: 2\n  micro_batch_size: [1,\n")
    return [PYTHON, ENTRY, "--config", str(cfg)]


def garbage_tokenizer(folder: Path) -> list[str]:
    tok = folder / "broken.model"
    tok.write_bytes(b"this is not a sentencepiece model")
    return [PYTHON, ENTRY, *base(folder, tokenizer=str(tok))]


def unsupported_teacher(folder: Path, launcher: bool = False) -> list[str]:
    """A Hugging Face directory of a model_type the framework has no mapping for (Gemma's config.json)."""
    import transformers

    teacher = folder / "gemma"
    transformers.GemmaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1).save_pretrained(teacher)
    args = base(folder, "--ki.enabled", "true", "--ki.teacher_path", f"hf:{teacher}")
    if launcher:
        args += ["--train.global_batch_size", "4"]
    return ["bash", SCRIPT, *args] if launcher else [PYTHON, ENTRY, *args]


def script(*extra: str, env: dict[str, str] | None = None):
    def setup(folder: Path) -> list[str]:
        return ["bash", SCRIPT, *base(folder, *extra)]

    return setup


LAUNCHER_ENV = {
    "CPU_RANKS": "2",
    "DEEPSPEED": deepspeed_bin(),
    "PATH": f"{Path(deepspeed_bin()).parent}{os.pathsep}{os.environ['PATH']}",
}

CASES = [
    BadInput("unknown_key", entry("--train.no_such_option", "1"), ("train.no_such_option",), 2),
    BadInput("bad_value", entry("--train.zero_stage", "3"), ("train.zero_stage", "must be 0, 1 or 2"), 2),
    BadInput("wrong_type", entry("--train.train_steps", "many"), ("train.train_steps", "many"), 2),
    BadInput(
        "missing_config_file",
        lambda f: [PYTHON, ENTRY, "--config", str(f / "nope.yaml")],
        ("nope.yaml",),
        2,
    ),
    BadInput("malformed_yaml", bad_yaml, ("run.yaml",), 2),
    BadInput(
        "no_data_path",
        lambda f: [PYTHON, ENTRY, "--config", str(CONFIGS / "tiny_gpt2.yaml")],
        ("data.data_path",),
        2,
    ),
    BadInput("bad_split", entry("--data.split", "90,abc"), ("data.split",), 2),
    BadInput(
        "world_size_mismatch", entry("--parallel.tensor_parallel", "2"), ("parallel.tensor_parallel",), 2
    ),
    BadInput(
        "negative_exit_duration",
        entry("--train.exit_duration_mins", "-1"),
        ("train.exit_duration_mins", "must be positive"),
        2,
    ),
    BadInput("ki_without_teacher", entry("--ki.enabled", "true"), ("ki.",), 2),
    BadInput(
        "model_vocab_below_tokenizer",
        entry("--model.vocab_size", "256"),
        ("model.vocab_size", "256", "512"),
        2,
    ),
    BadInput(
        "missing_data_prefix",
        lambda f: [PYTHON, ENTRY, *base(f, data=str(f / "none_text_document"))],
        ("none_text_document",),
    ),
    BadInput("truncated_idx", truncated(".idx", 40), ("copy_text_document.idx",)),
    BadInput("truncated_bin", truncated(".bin", 100), ("copy_text_document.bin",)),
    BadInput(
        "missing_tokenizer",
        lambda f: [PYTHON, ENTRY, *base(f, tokenizer=str(f / "absent.model"))],
        ("absent.model",),
    ),
    BadInput("garbage_tokenizer", garbage_tokenizer, ("broken.model",)),
    BadInput(
        "teacher_checkpoint_missing",
        entry("--ki.enabled", "true", "--ki.teacher_path", "/nonexistent/teacher_ckpt"),
        ("ki.teacher_path", "/nonexistent/teacher_ckpt", "no such directory"),
        2,
    ),
    BadInput(
        "token_ids_beyond_vocab",
        entry("--data.tokenizer_type", "none", "--model.vocab_size", "300"),
        ("synth_text_document", "300"),
    ),
    BadInput(
        "launcher_missing_config_env",
        lambda f: ["bash", SCRIPT],
        ("set CONFIG=",),
        2,
        env={"CONFIG": ""},
        error_prefix="pretrain_ki.sh: error:",
    ),
    BadInput(
        "launcher_bad_rank_count",
        lambda f: ["bash", SCRIPT, "--config", str(CONFIGS / "tiny_gpt2.yaml")],
        ("CPU_RANKS", "zero"),
        2,
        env={"CPU_RANKS": "zero", "DS_ACCELERATOR": "cpu"},
        error_prefix="pretrain_ki.sh: error:",
    ),
    BadInput(
        "two_ranks_missing_data_prefix",
        lambda f: [
            "bash",
            SCRIPT,
            *base(f, "--train.global_batch_size", "4", data=str(f / "gone_text_document")),
        ],
        ("gone_text_document",),
        env={**LAUNCHER_ENV},
        timeout=180,
    ),
    BadInput(
        "two_ranks_unsupported_hf_teacher",
        lambda f: unsupported_teacher(f, launcher=True),
        ("ki.teacher_path", "model_type 'gemma' unsupported", "'qwen3'"),
        2,
        env={**LAUNCHER_ENV},
        timeout=180,
    ),
    BadInput(
        "two_ranks_bad_config",
        script("--train.zero_stage", "7"),
        ("train.zero_stage",),
        2,
        env={**LAUNCHER_ENV},
        timeout=180,
    ),
]


def _env(case: BadInput) -> BadInput:
    """Cases without the launcher's rank count run as one rank with a rendezvous of their own."""
    if "CPU_RANKS" in case.env:
        return case
    return BadInput(**{**case.__dict__, "env": {**single_rank_env(), **case.env}})


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_entry")
    corpus = build_corpus(root / "corpus")
    CORPUS.update(prefix=Path(corpus.prefix), tokenizer=Path(corpus.tokenizer))
    return run_all([_env(c) for c in CASES], root / "cases")


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_bad_input(outcomes, name):
    outcome = outcomes[name]
    check(outcome)
    case = outcome.case
    if case.error_prefix is None:
        assert outcome.error_lines()[-1].startswith(PREFIX), outcome.error_lines()
