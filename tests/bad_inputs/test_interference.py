"""Silent disagreements and shared folders (issue 28), as a new user meets them: a tokenizer of the same size
but other content (data, teacher, offline targets, a blend, a merge, the precompute), a second job on one
checkpoint or targets folder, a compiled op that computes wrong.

``ROWS`` are refusals (one line naming both sides, the documented exit code); ``HANDLED`` are the cases that
must go on with one log line: data written before fingerprints, a lock left by a dead job (the requeued job
resuming its own folder), the option for appended pieces, a wrong kernel replaced by the reference.
The module fixture makes a second 512-piece tokenizer trained on other text, saved as ``sp.model`` in another
folder (the checks that compare file names cannot tell the two apart), and the inputs made with it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_inputs.harness import PYTHON, ROOT, BadInput, check, run_all, single_rank_env, tool
from tests.training_utils import CONFIGS, build_corpus, quiet_args, synthetic_documents, write_teacher

pytestmark = pytest.mark.distributed  # most rows start pretrain_ki.py (DeepSpeed, a process group)

ENTRY = "pretrain_ki.py: error:"
RES: dict[str, Path] = {}


# ------------------------------------------------------------------------------------------- inputs
def other_tokenizer(root: Path) -> str:
    """A 512-piece BPE model with the same special pieces, trained on other text, named sp.model."""
    from megatron_ki.data.train_tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "other.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in synthetic_documents(seed=7):
            f.write(json.dumps({"text": doc[::-1]}) + "\n")
    return train_sentencepiece(
        str(jsonl), str(root / "sp"), 512, special_tokens=["<mask>", "<pad>", "<eod>"], sample_size=0
    )


def appended_tokenizer(model: str, out: Path) -> str:
    """``model`` with 8 user-defined pieces appended (520 pieces, the first 512 are ``model``'s)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    for i in range(8):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<extra_{i}>", 0.0, 4
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return str(out)


def preprocess(jsonl: Path, model: str, prefix: Path) -> str:
    from megatron_ki.data.preprocess import main as preprocess_main

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rc = preprocess_main(
        [
            "--input", str(jsonl), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--append-eod", "--eod-token", "<eod>", "--output-prefix", str(prefix), "--log-interval", "1000000",
        ]
    )  # fmt: skip
    assert rc == 0
    return f"{prefix}_text_document"


def without_fingerprint(prefix: str, out: Path) -> str:
    """A copy of the dataset whose sidecar is as one written before fingerprints."""
    from megatron_ki.data.indexed import read_stats, write_stats

    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(out) + ext)
    record = read_stats(prefix)
    drop = ("tokenizer_fingerprint", "version", "bin", "bin_size", "bin_mtime_ns")
    write_stats(str(out), {k: v for k, v in record.items() if k not in drop})
    return str(out)


def teacher_with_tokenizer(root: Path, model: str) -> Path:
    """The seeded tiny teacher, its meta.json recording the fingerprint of ``model``."""
    from megatron_ki.checkpoint_format import read_meta, write_meta
    from megatron_ki.data import build_tokenizer
    from megatron_ki.data.tokenizer_identity import FIELD, fingerprint

    teacher = write_teacher(root, "tiny_gpt2.yaml")
    tag, meta = read_meta(teacher)
    meta.pop("format_version")
    fp = fingerprint(build_tokenizer("SentencePieceTokenizer", model))
    write_meta(teacher / tag, {**meta, FIELD: fp})
    return teacher


def train_argv(folder: Path, *extra: str, data: str | None = None, tokenizer: str | None = None) -> list[str]:
    args = [
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--train.train_steps", "1",
        "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2",
        "--data.data_path", *(data or str(RES["prefix"])).split(),
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", tokenizer or str(RES["tokenizer"]),
        "--data.seq_length", "32",
        "--data.cache_dir", str(folder / "index-cache"),
        *quiet_args(folder / "run"),
        *extra,
    ]  # fmt: skip
    return tool("pretrain_ki.py", *args)


def precompute_argv(folder: Path, teacher: Path, *extra: str, data: str | None = None, tokenizer=None):
    return tool(
        "tools/precompute_teacher.py",
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--output", str(folder / "targets" / "synth"),
        "--top-k", "4",
        "--temperature", "2",
        "--ki.teacher_path", str(teacher),
        "--data.data_path", data or str(RES["prefix"]),
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", tokenizer or str(RES["tokenizer"]),
        *extra,
    )  # fmt: skip


def held_lock(path: Path, host: str | None = None, pid: int | None = None, job: str | None = None) -> None:
    """A lock as another job writes it; by default held by this test process (alive, this host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "host": host or socket.gethostname(),
        "pid": os.getpid() if pid is None else pid,
        "job_id": job,
        "start_time": "2026-12-07T21:00:00Z",
        "token": "the-other-job",
    }
    path.write_text(json.dumps(record))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------- refusals
def second_job(folder: Path) -> list[str]:
    held_lock(folder / "ckpt" / ".lock", job="1001")
    return train_argv(folder, "--checkpoint.save", str(folder / "ckpt"))


def second_precompute(folder: Path) -> list[str]:
    held_lock(folder / "targets" / "synth.lock", job="1002")
    return precompute_argv(folder, RES["teacher"])


def blend(folder: Path) -> list[str]:
    return train_argv(folder, data=f"0.5 {RES['prefix']} 0.5 {RES['other_prefix']}")


def merge(folder: Path) -> list[str]:
    return tool(
        "tools/merge_datasets.py",
        "--input", str(RES["prefix"]), str(RES["other_prefix"]),
        "--output-prefix", str(folder / "merged" / "ab_text_document"),
    )  # fmt: skip


ROWS = [
    BadInput(
        "data_of_another_tokenizer",
        lambda f: train_argv(f, tokenizer=str(RES["other_tokenizer"])),
        ("data.tokenizer_model", "other/sp.model", "is not the tokenizer the data was made with", "first different piece at id"),
        2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "teacher_of_another_tokenizer",
        lambda f: train_argv(f, "--ki.enabled", "true", "--ki.teacher_path", str(RES["other_teacher"])),
        ("ki.teacher_path", "other_teacher/teacher/meta.json", "another tokenizer", "first different piece at id"),
        2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "targets_of_another_tokenizer",
        lambda f: train_argv(
            f, "--ki.enabled", "true", "--ki.teacher_targets", str(RES["other_targets"]), "--ki.temperature", "2",
            data=str(RES["old_prefix"]),
        ),
        ("ki.teacher_targets", "synth.idx", "another tokenizer", "first different piece at id"),
        2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "blend_of_two_tokenizers",
        blend,
        ("data.data_path", "other_text_document", "another tokenizer", "first different piece at id"),
        2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "merge_of_two_tokenizers",
        merge,
        ("other_text_document", "another tokenizer", "first different piece at id"),
        1,
        error_prefix="merge_datasets.py: error:",
    ),
    BadInput(
        "precompute_teacher_of_another_tokenizer",
        lambda f: precompute_argv(f, RES["other_teacher"]),
        ("ki.teacher_path", "other_teacher/teacher/meta.json", "another tokenizer"),
        2,
        error_prefix="precompute_teacher.py: error:",
    ),
    BadInput(
        "appended_pieces_without_the_option",
        lambda f: train_argv(f, "--model.vocab_size", "640", tokenizer=str(RES["appended"])),
        ("data.tokenizer_model", "520 vs 512 pieces", "data.accept_prefix_tokenizer"),
        2,
        error_prefix=ENTRY,
    ),
    BadInput(
        "second_job_same_checkpoint_folder",
        second_job,
        ("checkpoint.save", "in use by another job", f"pid {os.getpid()}", "Slurm job 1001"),
        1,
        keep=("ckpt/.lock",),
        error_prefix=ENTRY,
    ),
    BadInput(
        "second_precompute_same_output",
        second_precompute,
        ("--output", "in use by another job", "Slurm job 1002", "synth.lock"),
        1,
        keep=("targets/synth.lock",),
        error_prefix="precompute_teacher.py: error:",
    ),
]  # fmt: skip


# ------------------------------------------------------------------------------------------ handled
def stale_lock(folder: Path) -> list[str]:
    """The requeued job resuming its own folder: its earlier allocation was killed, its lock left behind."""
    held_lock(folder / "ckpt" / ".lock", pid=dead_pid(), job="2001")
    return train_argv(folder, "--checkpoint.save", str(folder / "ckpt"), "--checkpoint.load", str(folder / "ckpt"),
                      "--checkpoint.load_if_exists", "true")  # fmt: skip


HANDLED = [
    (
        BadInput("old_data_without_fingerprint", lambda f: train_argv(f, data=str(RES["old_prefix"])), (), 0),
        "no tokenizer fingerprint recorded in",
    ),
    (
        BadInput("requeued_job_takes_over_a_dead_lock", stale_lock, (), 0, env={"SLURM_JOB_ID": "2001"}),
        "taking over the lock of a dead job",
    ),
    (
        BadInput(
            "appended_pieces_with_the_option",
            lambda f: train_argv(
                f, "--model.vocab_size", "640", "--data.accept_prefix_tokenizer", "true",
                tokenizer=str(RES["appended"]),
            ),
            (),
            0,
        ),
        None,
    ),
    (
        BadInput(
            "wrong_kernel_falls_back_to_the_reference",
            lambda f: [PYTHON, str(ROOT / "tests" / "bad_inputs" / "wrong_kernel_entry.py"),
                       *train_argv(f, "--model.attention_backend", "fused_softmax")[2:]],
            (),
            0,
        ),
        "disagree with the PyTorch reference at start-up",
    ),
]  # fmt: skip


def _env(case: BadInput) -> BadInput:
    return BadInput(**{**case.__dict__, "env": {**single_rank_env(), **case.env}})


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from tests.training_utils import launch

    root = tmp_path_factory.mktemp("interference")
    corpus = build_corpus(root / "corpus")
    other = other_tokenizer(root / "other")
    RES.update(prefix=Path(corpus.prefix), tokenizer=Path(corpus.tokenizer), other_tokenizer=Path(other))
    RES["other_prefix"] = preprocess(root / "corpus" / "corpus.jsonl", other, root / "data" / "other")
    RES["old_prefix"] = without_fingerprint(corpus.prefix, root / "data" / "old_text_document")
    RES["teacher"] = write_teacher(root / "teacher", "tiny_gpt2.yaml")
    RES["other_teacher"] = teacher_with_tokenizer(root / "other_teacher", other)
    RES["appended"] = Path(appended_tokenizer(corpus.tokenizer, root / "appended" / "sp.model"))
    # targets computed over the (fingerprint-less) copy of the data, with the other tokenizer: their header
    # names a tokenizer sp.model of 512 pieces, which is all the checks before this change compared
    targets = root / "targets" / "synth"
    args = precompute_argv(root, RES["teacher"], data=RES["old_prefix"], tokenizer=other)[2:]
    result = launch(1, args, root / "precompute", entry=ROOT / "tools" / "precompute_teacher.py", timeout=300)
    assert result.returncode == 0, result.tail()
    RES["other_targets"] = targets
    cases = [_env(c) for c in ROWS] + [_env(c) for c, _ in HANDLED]
    return run_all(cases, root / "cases")


@pytest.mark.parametrize("name", [c.name for c in ROWS])
def test_refused(outcomes, name):
    check(outcomes[name])


@pytest.mark.parametrize("name", [c.name for c, _ in HANDLED])
def test_handled(outcomes, name):
    outcome = outcomes[name]
    said = dict((c.name, s) for c, s in HANDLED)[name]
    out = outcome.output
    assert outcome.returncode == 0, f"{name}: exit code {outcome.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    if said is not None:
        assert sum(said in line for line in out.splitlines()) == 1, (
            f"{name}: not once: {said!r}\n{out[-3000:]}"
        )
    if name == "requeued_job_takes_over_a_dead_lock":
        assert not (outcome.folder / "ckpt" / ".lock").exists(), "the lock was not released at the end"
        # the checkpoint records what its tokenizer is, for a run that takes it as its teacher
        from megatron_ki.checkpoint_format import read_meta
        from megatron_ki.data.tokenizer_identity import FIELD, recorded_in_stats

        meta = read_meta(outcome.folder / "ckpt")[1]
        assert meta[FIELD] == recorded_in_stats(str(RES["prefix"]))
