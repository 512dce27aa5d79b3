"""KI from offline teacher targets (``ki.teacher_targets``): precompute once with tools/precompute_teacher.py,
train students from the files, no teacher in the run.

- The samples carry the targets of their own tokens, whatever the sequence length (rows are looked up by the
  tokens' positions in the .bin), and a pairing with another dataset or temperature is refused up front.
- With the K largest of a 512-token vocabulary kept, offline KI gives the same per-step losses at tp=2 and at
  pp=2 as at tp=pp=1 (the parity tolerance of tests/test_training.py), a KD term that falls with a_t, and no
  teacher FLOPs.
- Slow: a second student of another shape, sequence length and data-parallel size trains from the same files.
- Masked LM: a RoBERTa teacher's targets under a static mask (data.mask_seed): the samples' predicted tokens
  carry their rows, tp=2 and pp=2 equal one rank, and a student masking otherwise is refused up front.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.training_utils import CONFIGS, ROOT, build_corpus, launch, quiet_args, write_teacher

pytestmark = pytest.mark.distributed  # launches
TOOL = ROOT / "tools" / "precompute_teacher.py"
K, TAU, STEPS = 16, 2.0, 3
PARITY = {"rel_tol": 1e-5, "abs_tol": 1e-6}


def precompute_args(config: str, corpus, teacher, targets, *extra: str) -> list[str]:
    """tools/precompute_teacher.py's arguments: K and TAU over the test corpus with its tokenizer."""
    return [
        "--config", str(CONFIGS / config),
        "--output", str(targets),
        "--top-k", str(K),
        "--temperature", str(TAU),
        "--ki.teacher_path", str(teacher),
        "--data.data_path", corpus.prefix,
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", corpus.tokenizer,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The test corpus, a tiny GPT teacher and its targets, precomputed once (one rank)."""
    root = tmp_path_factory.mktemp("offline_ki")
    corpus = build_corpus(root / "corpus")
    teacher = write_teacher(root / "teacher", "tiny_gpt2.yaml")
    targets = root / "targets" / "synth"
    args = precompute_args("tiny_gpt2.yaml", corpus, teacher, targets)
    result = launch(1, args, root / "precompute", entry=TOOL, timeout=300)
    assert result.returncode == 0, result.tail()
    return root, corpus, targets


def _student_args(root, corpus, targets, config: str, name: str, *extra: str) -> list[str]:
    run_dir = root / "runs" / name
    return [
        "--config", str(CONFIGS / config),
        "--train.train_steps", str(STEPS),
        "--train.micro_batch_size", "4",
        "--train.global_batch_size", "8",
        *corpus.data_args(run_dir / "index-cache"),
        *quiet_args(run_dir),
        "--ki.enabled", "true",
        "--ki.teacher_targets", str(targets),
        "--ki.temperature", str(TAU),
        "--ki.alpha0", "0.5",
        "--ki.decay_steps", "100",
        *extra,
    ]  # fmt: skip


def student_args(ws, name: str, *extra: str) -> list[str]:
    return _student_args(*ws, "tiny_gpt2.yaml", name, *extra)


def assert_same_curves(got, want, name: str) -> None:
    for key in ("loss", "lm_loss", "kd_loss"):
        a, b = got.losses(key), want.losses(key)
        assert all(math.isclose(x, y, **PARITY) for x, y in zip(a, b, strict=True)), (name, key, a, b)


def launched(ranks: int, args: list[str], run_dir, name: str):
    result = launch(ranks, args, run_dir, timeout=300)
    assert result.returncode == 0, f"{name}: launch failed (rc {result.returncode}):\n{result.tail()}"
    return result


def train(ws, name: str, ranks: int, *extra: str):
    return launched(ranks, student_args(ws, name, *extra), ws[0] / "runs" / name, name)


def test_samples_carry_the_targets_of_their_tokens(ws):
    from megatron_ki.data.gpt_dataset import GPTDataset
    from megatron_ki.data.teacher_targets import TeacherTargets

    root, corpus, targets_path = ws
    targets = TeacherTargets(str(targets_path), corpus.prefix)
    assert (targets.k, targets.temperature) == (K, TAU)
    seen: dict[int, np.ndarray] = {}
    for seq in (16, 37):  # two students' sequence lengths read the same rows for the same tokens
        ds = GPTDataset(corpus.prefix, None, seq, 30, seed=seq, cache_dir=str(root / "cache"))
        ds.targets = targets
        for i in range(len(ds)):
            item, positions = ds[i], ds.sample_positions(int(ds.shuffle_idx[i]))[:-1]
            ids, logp, tail = targets.rows(positions)
            np.testing.assert_array_equal(item["t_ids"], ids)
            np.testing.assert_array_equal(item["t_logp"], logp)
            np.testing.assert_array_equal(item["t_tail"], tail)
            for p, row in zip(positions.tolist(), item["t_ids"], strict=True):
                np.testing.assert_array_equal(seen.setdefault(p, row), row)
    assert len(seen) > 100


def test_mismatched_targets_are_refused_before_start(ws, tmp_path):
    from megatron_ki.config import ConfigError, parse_args
    from megatron_ki.data.indexed import IndexedDataset, IndexedDatasetBuilder
    from megatron_ki.training.run import open_teacher_targets

    _, corpus, targets = ws
    cfg = parse_args(student_args(ws, "refused", "--ki.temperature", "1.0"))
    with pytest.raises(ConfigError, match=rf"ki.temperature.*1.0 differs from the temperature {TAU}"):
        open_teacher_targets(cfg)
    other = tmp_path / "other"
    src = IndexedDataset(corpus.prefix)
    with IndexedDatasetBuilder(other, dtype=src.dtype) as b:
        for s in range(5):
            b.add_document(src[s])
    cfg = parse_args(student_args(ws, "refused", "--data.data_path", str(other)))
    with pytest.raises(ConfigError, match=rf"ki.teacher_targets.*{targets}.*computed for dataset.*{other}"):
        open_teacher_targets(cfg)


def test_offline_ki_tp2_and_pp2_equal_single_rank(ws):
    single = train(ws, "tp1_pp1", 1)
    steps = [m for m in single.metrics() if "split" not in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert all(m["kd_loss"] is not None and math.isfinite(m["kd_loss"]) and m["kd_loss"] > 0 for m in steps)
    assert all(m["teacher_lm_loss"] is None for m in steps)  # no teacher in the run
    student_only = train(ws, "scratch", 1, "--ki.enabled", "false")
    flops = [m["flops"] for m in single.metrics() if "split" not in m]
    assert flops == [m["flops"] for m in student_only.metrics() if "split" not in m]  # no teacher FLOPs
    for name, extra in (
        # tp=2 with sequence parallelism: the sparse loss reads the logits the heads gather back whole
        ("tp2_sp", ("--parallel.tensor_parallel", "2", "--parallel.sequence_parallel", "true")),
        ("pp2", ("--parallel.pipeline_parallel", "2")),
    ):
        other = train(ws, name, 2, *extra)
        assert_same_curves(other, single, name)


@pytest.mark.slow
def test_a_student_of_another_shape_trains_from_the_same_files(ws):
    other = train(
        ws,
        "other_shape_dp2",
        2,
        "--model.num_layers", "3",
        "--model.hidden_size", "48",
        "--model.num_attention_heads", "4",
        "--model.ffn_hidden_size", "96",
        "--data.seq_length", "24",
    )  # fmt: skip
    kd = [m["kd_loss"] for m in other.metrics() if "split" not in m]
    assert len(kd) == STEPS and all(math.isfinite(x) and x > 0 for x in kd)


# ------------------------------------------------------------------------------------ masked-LM teacher
MASK_SEED = 17


@pytest.fixture(scope="module")
def mlm_ws(ws):
    """A tiny RoBERTa teacher's targets under the static mask of MASK_SEED (in process, one rank)."""
    import importlib.util
    import sys

    from megatron_ki.data import build_tokenizer

    root, corpus, _ = ws
    pad = build_tokenizer("SentencePieceTokenizer", corpus.tokenizer).pad
    teacher = write_teacher(root / "teacher_roberta", "tiny_roberta.yaml", overrides={"pad_token_id": pad})
    spec = importlib.util.spec_from_file_location("precompute_teacher_mlm", TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    targets = root / "targets" / "mlm"
    args = precompute_args("tiny_roberta.yaml", corpus, teacher, targets, "--data.mask_seed", str(MASK_SEED))
    assert tool.precompute(args) == 0
    return root, corpus, targets, pad


def mlm_student_args(mlm_ws, name: str, *extra: str) -> list[str]:
    root, corpus, targets, pad = mlm_ws
    roberta = ("--model.pad_token_id", str(pad), "--data.mask_seed", str(MASK_SEED))
    return _student_args(root, corpus, targets, "tiny_roberta.yaml", name, *roberta, *extra)


def test_mlm_samples_carry_the_targets_of_their_masked_tokens(mlm_ws):
    from megatron_ki.data import build_tokenizer
    from megatron_ki.data.mlm_dataset import IGNORE_INDEX, MLMDataset
    from megatron_ki.data.static_mask import StaticMasking
    from megatron_ki.data.teacher_targets import TeacherTargets

    root, corpus, targets_path, _ = mlm_ws
    targets = TeacherTargets(str(targets_path), corpus.prefix)
    tok = build_tokenizer("SentencePieceTokenizer", corpus.tokenizer)
    predicted = 0
    for seq in (16, 37):
        ds = MLMDataset(corpus.prefix, None, seq, 40, seq, tok, cache_dir=str(root / "cache"),
                        static_mask=StaticMasking(MASK_SEED))  # fmt: skip
        ds.targets = targets
        for i in range(len(ds)):
            item = ds[i]
            at = np.flatnonzero(item["labels"] != IGNORE_INDEX)
            positions = ds.block_positions(int(ds.shuffle_idx[i]))[at - 1]
            ids, logp, tail = targets.rows(positions)
            np.testing.assert_array_equal(item["t_ids"][at], ids)
            np.testing.assert_array_equal(item["t_logp"][at], logp)
            np.testing.assert_array_equal(item["t_tail"][at], tail)
            predicted += len(at)
    assert predicted > 100


def test_mlm_students_masking_otherwise_are_refused(mlm_ws, ws):
    from megatron_ki.config import ConfigError, parse_args
    from megatron_ki.training.run import open_teacher_targets

    args = mlm_student_args(mlm_ws, "r")
    at = args.index("--data.mask_seed")
    with pytest.raises(ConfigError, match=r"data.mask_seed.*is required with ki.teacher_targets"):
        parse_args(args[:at] + args[at + 2 :]).validate(1)
    for extra, words in (
        (("--data.mask_seed", "18"), r"data.mask_seed.*seed 17 there, 18 here"),
        (("--data.mask_prob", "0.2"), r"data.mask_prob.*mask_prob 0.15 there, 0.2 here"),
        (("--ki.teacher_targets", str(ws[2])), r"hold a causal teacher's targets.*'roberta'"),
    ):
        with pytest.raises(ConfigError, match=words):
            open_teacher_targets(parse_args(mlm_student_args(mlm_ws, "r", *extra)))
    with pytest.raises(ConfigError, match=r"hold a masked-LM teacher's targets.*'gpt2'"):
        open_teacher_targets(parse_args(student_args(ws, "r", "--ki.teacher_targets", str(mlm_ws[2]))))


def test_mlm_offline_ki_tp2_and_pp2_equal_single_rank(mlm_ws):
    """Also: the default path (the head projects the masked positions only) equals the logits path."""

    def train_mlm(name: str, ranks: int, *extra: str):
        return launched(ranks, mlm_student_args(mlm_ws, name, *extra), mlm_ws[0] / "runs" / name, name)

    single = train_mlm("mlm_tp1", 1)
    kd = [m["kd_loss"] for m in single.metrics() if "split" not in m]
    assert len(kd) == STEPS and all(math.isfinite(x) and x > 0 for x in kd)
    assert "output head + loss: fused (the head projects the loss positions only" in single.output
    for name, ranks, extra in (
        ("mlm_logits", 1, ("--train.fused_head_loss", "false")),
        ("mlm_tp2", 2, ("--parallel.tensor_parallel", "2")),
        ("mlm_pp2", 2, ("--parallel.pipeline_parallel", "2")),
    ):
        other = train_mlm(name, ranks, *extra)
        assert_same_curves(other, single, name)
