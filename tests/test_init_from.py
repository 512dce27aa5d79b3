"""Training from grown weights (``checkpoint.init_from``) under the real launcher.

A tiny GPT-2 teacher saved at tp=2 is grown by ``tools/grow_checkpoint.py`` into the tiny student (2x wide,
2x deep, written at tp=1 x pp=2) and trained at tp=2 x pp=2 (resharded on load) with KI from that teacher: the
evaluation before step 1
gives the student's loss equal to the teacher's on the same fixed samples (the growth keeps the function;
fp32, 1e-5), the run starts at step 1 with the warm-up's first learning rate, and one log line says what was
loaded. A requeued run whose ``checkpoint.load`` holds a checkpoint resumes it and ignores ``init_from``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ki.config import Config, OptimConfig, model_config_from_yaml
from megatron_ki.training.lr import lr_at
from tests.training_utils import CONFIGS, ROOT, build_corpus, launch, quiet_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STUDENT = CONFIGS / "tiny_gpt2.yaml"
GROWN_LAYERS = "4"


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    import dataclasses

    from megatron_ki.convert.reshard import write_checkpoint
    from megatron_ki.models import build_model

    root = tmp_path_factory.mktemp("init_from")
    corpus = build_corpus(root / "corpus")
    student = model_config_from_yaml(STUDENT)
    teacher_cfg = dataclasses.replace(student, hidden_size=32, num_attention_heads=2, ffn_hidden_size=128)
    full = {k: v.detach().clone() for k, v in build_model(teacher_cfg, seed=3).state_dict().items()}
    write_checkpoint(full, Config(model=teacher_cfg), root / "teacher", tp=2, pp=1, tag="teacher")
    cmd = [
        sys.executable, str(ROOT / "tools" / "grow_checkpoint.py"),
        "--load", str(root / "teacher"), "--config", str(STUDENT), "--save", str(root / "grown"),
        "--model.num_layers", GROWN_LAYERS, "--target-pp", "2", "--noise", "0.01",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return root, corpus


def train_args(root: Path, corpus, name: str, steps: int, *extra: str) -> list[str]:
    return [
        "--config", str(STUDENT),
        "--model.num_layers", GROWN_LAYERS,
        "--train.train_steps", str(steps),
        "--train.micro_batch_size", "2",
        "--train.global_batch_size", "4",
        "--train.eval_iters", "2",
        "--optim.lr_warmup_fraction", "0.5",
        *corpus.data_args(root / name / "index-cache"),
        *quiet_args(root / name),
        *extra,
    ]  # fmt: skip


def test_grown_student_starts_at_its_teachers_loss_at_tp2_pp2_and_trains_with_ki(grown):
    root, corpus = grown
    args = train_args(
        root, corpus, "ki", 4,
        "--parallel.pipeline_parallel", "2", "--parallel.tensor_parallel", "2",
        "--checkpoint.init_from", str(root / "grown"),
        "--train.eval_at_start", "true",
        "--ki.enabled", "true", "--ki.teacher_path", str(root / "teacher"), "--ki.teacher_dtype", "float32",
        "--ki.alpha0", "0.5", "--ki.decay_steps", "4",
    )  # fmt: skip
    result = launch(4, args, root / "ki", timeout=400)
    assert result.returncode == 0, result.tail()
    assert "checkpoint.init_from: weights of" in result.output and "(grown, identity)" in result.output
    start = [m for m in result.metrics() if m.get("split") == "valid" and m["step"] == 0]
    assert len(start) == 1, result.metrics()
    assert abs(start[0]["lm_loss"] - start[0]["teacher_lm_loss"]) < 1e-5, start[0]
    train = [m for m in result.metrics() if "split" not in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    # a fresh schedule from step 0 (the logged lr is the one set after the step: lr_at(step))
    warmup = OptimConfig(lr_warmup_fraction=0.5)
    assert [m["lr"] for m in train] == pytest.approx([lr_at(s, warmup, 4) for s in (1, 2, 3, 4)], rel=1e-6)
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]


def test_requeued_run_resumes_instead_of_reinitialising(grown):
    root, corpus = grown
    ckpt = root / "requeue_ckpt"
    common = ("--checkpoint.init_from", str(root / "grown"), "--checkpoint.save", str(ckpt),
              "--checkpoint.load", str(ckpt), "--checkpoint.load_if_exists", "true")  # fmt: skip
    first = launch(1, train_args(root, corpus, "requeue1", 2, *common), root / "requeue1")
    assert first.returncode == 0, first.tail()
    assert (
        "starting from scratch (load_if_exists)" in first.output
        and "checkpoint.init_from: weights of" in first.output
    )
    second = launch(1, train_args(root, corpus, "requeue2", 3, *common), root / "requeue2")
    assert second.returncode == 0, second.tail()
    assert f"checkpoint.init_from {root / 'grown'} ignored: resuming {ckpt}" in second.output
    assert [m["step"] for m in second.metrics() if "split" not in m] == [3]


def test_continued_pretraining_from_a_hugging_face_model(grown, tmp_path):
    """``init_from hf:DIR`` and ``init_from`` of the same model converted to a framework checkpoint start at
    the same loss: the model's own, on the same fixed samples."""
    transformers = pytest.importorskip("transformers")
    root, corpus = grown
    student = model_config_from_yaml(STUDENT)
    cfg = transformers.GPT2Config(
        vocab_size=student.vocab_size, n_positions=student.max_position_embeddings, n_embd=student.hidden_size,
        n_layer=2, n_head=student.num_attention_heads, n_inner=student.ffn_size, activation_function="gelu_new",
    )  # fmt: skip
    torch_hf = transformers.GPT2LMHeadModel(cfg)
    torch_hf.save_pretrained(tmp_path / "hf")
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "hf", "--load",
           str(tmp_path / "hf"), "--save", str(tmp_path / "converted"), "--make-vocab-size-divisible-by", "8",
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    starts = {}
    for name, source in (("hf", f"hf:{tmp_path / 'hf'}"), ("converted", str(tmp_path / "converted"))):
        args = train_args(root, corpus, f"cont_{name}", 1, "--model.num_layers", "2",
                          "--checkpoint.init_from", source, "--train.eval_at_start", "true")  # fmt: skip
        result = launch(1, args, root / f"cont_{name}")
        assert result.returncode == 0, result.tail()
        assert f"checkpoint.init_from: weights of {source}" in result.output
        (start,) = [m for m in result.metrics() if m.get("split") == "valid" and m["step"] == 0]
        starts[name] = start["lm_loss"]
    assert starts["hf"] == pytest.approx(starts["converted"], abs=1e-6)
