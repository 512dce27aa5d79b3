"""Bad checkpoints given to the entry point (``checkpoint.load``, ``ki.teacher_path``) and to
tools/convert_checkpoint.py: one line naming the file or option, exit code 1, nothing written, nothing lost.

The entry point runs as one process without the launcher (``RANK=0 WORLD_SIZE=1`` and a free port). The
checkpoint it resumes from is a real one: the module fixture trains a tiny GPT-2 for one step and saves it
(a single-process run takes a few seconds); each row damages a copy of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bad_inputs.harness import ROOT, BadInput, check, run_all, single_rank_env, tool
from tests.training_utils import CONFIGS, build_corpus, quiet_args, write_teacher

pytestmark = pytest.mark.distributed  # each case starts pretrain_ki.py (DeepSpeed, a process group)

ENTRY = "pretrain_ki.py: error:"
CONVERT = "convert_checkpoint.py: error:"
GROW = "grow_checkpoint.py: error:"
TAG = "step00000001"
RES: dict[str, Path] = {}
"""Shared inputs, made by the module fixture before the rows run: corpus, ckpt (a real checkpoint), teacher."""


def train_argv(folder: Path, *extra: str) -> list[str]:
    corpus = RES["corpus"]
    args = [
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--train.train_steps", "1",
        "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2",
        "--data.data_path", str(corpus / "synth_text_document"),
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", str(corpus / "sp.model"),
        "--data.seq_length", "32",
        "--data.cache_dir", str(folder / "index-cache"),
        *quiet_args(folder / "run"),
        *extra,
    ]  # fmt: skip
    return tool("pretrain_ki.py", *args)


def damaged_ckpt(folder: Path, *damage: str) -> Path:
    """A copy of the real checkpoint in ``folder/ckpt`` with each file in ``damage`` (relative to the tag)
    cut to half its size."""
    ckpt = folder / "ckpt"
    shutil.copytree(RES["ckpt"], ckpt)
    for rel in damage:
        path = ckpt / TAG / rel
        os.truncate(path, path.stat().st_size // 2)
    return ckpt


def damaged_teacher(folder: Path, rel: str | None = None, remove: bool = False) -> Path:
    teacher = folder / "teacher"
    shutil.copytree(RES["teacher"], teacher)
    if rel is not None:
        path = teacher / "teacher" / rel
        if remove:
            path.unlink()
        else:
            os.truncate(path, path.stat().st_size // 2)
    return teacher


def resume(*damage: str):
    def setup(folder: Path) -> list[str]:
        return train_argv(folder, "--checkpoint.load", str(damaged_ckpt(folder, *damage)))

    return setup


def empty_load_dir(folder: Path) -> list[str]:
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "README").write_text("checkpoints go here\n")
    return train_argv(folder, "--checkpoint.load", str(folder / "ckpt"))


def teacher_run(rel: str | None, remove: bool = False, missing: bool = False):
    def setup(folder: Path) -> list[str]:
        path = folder / "no_teacher" if missing else damaged_teacher(folder, rel, remove)
        return train_argv(folder, "--ki.enabled", "true", "--ki.teacher_path", str(path))

    return setup


def convert(*args: str, damage: str | None = None, tag: str | None = None):
    def setup(folder: Path) -> list[str]:
        teacher = damaged_teacher(folder, damage) if damage != "missing" else folder / "no_such_ckpt"
        extra = ["--tag", tag] if tag else []
        return tool(
            "tools/convert_checkpoint.py",
            *args,
            "--load",
            str(teacher),
            "--save",
            "out",
            "--no-progress",
            *extra,
        )

    return setup


def grow(folder: Path, *extra: str) -> list[str]:
    """tools/grow_checkpoint.py from the real (trained, tokenizer-recorded) checkpoint into a student twice as
    wide, with ``extra`` overrides."""
    return tool(
        "tools/grow_checkpoint.py",
        "--load", str(RES["ckpt"]),
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--save", "out",
        "--model.hidden_size", "128",
        "--model.num_attention_heads", "8",
        "--model.ffn_hidden_size", "512",
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", str(RES["corpus"] / "sp.model"),
        *extra,
    )  # fmt: skip


def other_tokenizer(folder: Path) -> str:
    """A sentencepiece model of the same size as the corpus's, trained on other documents."""
    import json

    from megatron_ki.data.train_tokenizer import train_sentencepiece
    from tests.training_utils import VOCAB_SIZE, synthetic_documents

    corpus = folder / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(seed=11)))
    return train_sentencepiece(
        str(corpus), str(folder / "other_sp"), VOCAB_SIZE, model_type="bpe",
        special_tokens=["<mask>", "<pad>", "<eod>"], sample_size=0, num_threads=1,
    )  # fmt: skip


ROWS = [
    BadInput(
        "load_dir_missing",
        lambda f: train_argv(f, "--checkpoint.load", str(f / "ckpt")),
        ("checkpoint.load", "/load_dir_missing/ckpt: does not exist", "checkpoint.load_if_exists true"),
        error_prefix=ENTRY,
    ),
    BadInput(
        "load_dir_empty",
        empty_load_dir,
        ("checkpoint.load", "/load_dir_empty/ckpt: holds no checkpoint (no 'latest' file, no tag)"),
        keep=("ckpt",),
        error_prefix=ENTRY,
    ),
    BadInput(
        "load_meta_truncated",
        resume("meta.json"),
        ("no complete checkpoint to resume from", f"/ckpt/{TAG}/meta.json: not valid JSON"),
        keep=("ckpt",),
        error_prefix=ENTRY,
    ),
    BadInput(
        "load_model_states_truncated",
        resume("mp_rank_00_model_states.pt"),
        (f"/ckpt/{TAG}/mp_rank_00_model_states.pt is truncated or corrupt (not a readable zip archive",),
        keep=("ckpt",),
        error_prefix=ENTRY,
    ),
    BadInput(
        "load_rng_truncated",
        resume("rng/rank00000.pt"),
        (f"/ckpt/{TAG}/rng/rank00000.pt is truncated or corrupt", "checkpoint.load"),
        keep=("ckpt",),
        error_prefix=ENTRY,
    ),
    BadInput(
        "teacher_missing",
        teacher_run(None, missing=True),
        ("ki.teacher_path", "checkpoint directory not found", "/teacher_missing/no_teacher"),
        2,  # found before any process group exists: a configuration error
        error_prefix=ENTRY,
    ),
    BadInput(
        "teacher_model_states_truncated",
        teacher_run("mp_rank_00_model_states.pt"),
        ("/teacher/teacher/mp_rank_00_model_states.pt is truncated or corrupt",),
        error_prefix=ENTRY,
    ),
    BadInput(
        "teacher_model_states_missing",
        teacher_run("mp_rank_00_model_states.pt", remove=True),
        ("checkpoint file missing", "/teacher/teacher/mp_rank_00_model_states.pt"),
        error_prefix=ENTRY,
    ),
    BadInput(
        "convert_load_missing",
        convert("--to", "hf", damage="missing"),
        ("checkpoint directory not found", "/convert_load_missing/no_such_ckpt"),
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=CONVERT,
    ),
    BadInput(
        "convert_model_states_truncated",
        convert("--target-tp", "2", damage="mp_rank_00_model_states.pt"),
        ("/teacher/teacher/mp_rank_00_model_states.pt is truncated or corrupt",),
        keep=("teacher",),
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=CONVERT,
    ),
    BadInput(
        "convert_meta_truncated",
        convert("--to", "hf", damage="meta.json"),
        ("/teacher/teacher/meta.json: not valid JSON",),
        keep=("teacher",),
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=CONVERT,
    ),
    BadInput(
        "convert_unknown_tag",
        convert("--target-tp", "2", tag="step00000042"),
        ("--tag step00000042", "does not exist", "tags there: teacher"),
        keep=("teacher",),
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=CONVERT,
    ),
    BadInput(
        "init_from_other_shape",
        lambda f: train_argv(f, "--checkpoint.init_from", str(RES["teacher"])),
        (
            "checkpoint.init_from",
            "/teacher holds a model of another shape",
            "hidden_size 32 there, 64 here",
            "tools/grow_checkpoint.py",
        ),
        exit_code=2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "init_from_missing",
        lambda f: train_argv(f, "--checkpoint.init_from", str(f / "no_such_ckpt")),
        ("checkpoint.init_from", "/no_such_ckpt: cannot be read", "no such directory"),
        exit_code=2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "grow_not_an_integer_factor",
        lambda f: grow(f, "--model.hidden_size", "96", "--model.num_attention_heads", "6"),
        ("model.hidden_size", "(96) is not an integer multiple of the teacher's (64)", "128"),
        exit_code=2,
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=GROW,
    ),
    BadInput(
        "grow_shallower_student",
        lambda f: grow(f, "--model.num_layers", "1"),
        ("model.num_layers", "1 layers, fewer than the teacher's 2"),
        exit_code=2,
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=GROW,
    ),
    BadInput(
        "grow_other_tokenizer",
        lambda f: grow(f, "--data.tokenizer_model", other_tokenizer(f)),
        (
            "teacher tokenizer (recorded in ",
            "/ckpt)",
            "other_sp.model",
            "differs from the student's",
            "at id",
        ),
        no_new=("*.tmp*", "out", ".out.*"),
        error_prefix=GROW,
    ),
]
ENTRY_ROWS = {r.name for r in ROWS if r.error_prefix == ENTRY}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_checkpoints")
    RES["corpus"] = build_corpus(root / "corpus").root
    RES["teacher"] = write_teacher(root / "teacher", "tiny_gpt2.yaml")
    RES["ckpt"] = root / "ckpt"
    run_dir = root / "source_run"
    argv = train_argv(run_dir, "--checkpoint.save", str(RES["ckpt"]))
    env = {**os.environ, **single_rank_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and (RES["ckpt"] / TAG).is_dir(), proc.stdout[-2000:] + proc.stderr[-3000:]
    # a free port of its own for each entry-point row, so that rows run side by side
    rows = [BadInput(**{**r.__dict__, "env": single_rank_env()}) if r.name in ENTRY_ROWS else r for r in ROWS]
    return run_all(rows, root / "cases")


@pytest.mark.parametrize("name", [r.name for r in ROWS])
def test_bad_checkpoint(outcomes, name):
    outcome = outcomes[name]
    check(outcome)
    if name.startswith("convert_"):
        assert not (outcome.folder / "out").exists()


def test_debug_shows_the_traceback(outcomes, tmp_path):
    """--debug: the same failure keeps its traceback (and exit code)."""
    argv = convert("--to", "hf", damage="meta.json")(tmp_path)
    proc = subprocess.run([*argv, "--debug"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert (
        "Traceback" in proc.stderr and "CheckpointError" in proc.stderr and "JSONDecodeError" in proc.stderr
    )
