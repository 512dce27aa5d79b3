"""tools/precompute_teacher.py on a tiny GPT teacher over the synthetic test corpus: rows equal a dense
in-process reference (the teacher's log-softmax at the temperature over each sequence, windowed as the
header states), dp = 2 equals dp = 1 byte for byte, tp = 2 equals tp = 1 to float rounding, pp = 2 (and
tp = 2 x pp = 2) equals pp = 1 with each stage holding and reading only its layers, and a run killed
(SIGKILL) between writing a chunk and recording it resumes to the same bytes."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ki.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_ki.data.teacher_targets import (
    FP16_RELATIVE_ERROR,
    INT8_MAX_ERROR,
    TeacherTargets,
    TeacherTargetsError,
)
from megatron_ki.ki.precompute import local_topk, plan_windows, sort_desc_lower_id
from tests.distributed import run_distributed
from tests.training_utils import CONFIGS, ROOT, build_corpus, launch, write_teacher

TOOL = ROOT / "tools" / "precompute_teacher.py"
SCRIPT = ["bash", str(ROOT / "launch" / "pretrain_ki.sh")]
K, TAU, WINDOW = 8, 1.5, 48


NREF = 40
"""Sequences of the reference (and of the small dataset the in-process tests use)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(root, corpus, teacher, small)``: the test corpus, a tiny GPT teacher, and a corpus of the first
    NREF sequences (rows depend only on their own sequence, so its rows are the corpus's first rows)."""
    root = tmp_path_factory.mktemp("precompute")
    corpus = build_corpus(root / "corpus")
    teacher = write_teacher(root / "teacher", "tiny_gpt2.yaml")
    ds = IndexedDataset(corpus.prefix)
    with IndexedDatasetBuilder(root / "small", dtype=ds.dtype) as b:
        for s in range(NREF):
            b.add_document(ds[s])
    small = dataclasses.replace(corpus, prefix=str(root / "small"))
    return root, corpus, teacher, small


def tool_module():
    spec = importlib.util.spec_from_file_location("precompute_teacher_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tool_args(corpus, teacher, out, *extra: str) -> list[str]:
    return [
        "--output", str(out),
        "--top-k", str(K),
        "--temperature", str(TAU),
        "--window", str(WINDOW),
        "--chunk-tokens", "1024",
        "--batch-tokens", "512",
        "--ki.teacher_path", str(teacher),
        "--data.data_path", corpus.prefix,
        "--data.tokenizer_type", "SentencePieceTokenizer",
        "--data.tokenizer_model", corpus.tokenizer,
        *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ reference
def reference_rows(corpus, teacher) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense reference, one window at a time without padding: ``(ids, logp, tail, sorted full logp)``."""
    from megatron_ki.convert.reshard import load_full_state
    from megatron_ki.models import build_model

    _, cfg, full = load_full_state(teacher)
    model = build_model(cfg).eval()
    model.load_state_dict(full)
    ds = IndexedDataset(corpus.prefix)
    rows = []
    stride = WINDOW // 2
    with torch.no_grad():
        for s in range(NREF):
            tokens = torch.from_numpy(ds[s].astype(np.int64))
            start, keep = 0, 0
            while True:  # the header's policy, written out: windows every stride, keep past the last end
                window = tokens[start : start + WINDOW]
                logits = model(input_ids=window[None])[0, :, : cfg.vocab_size].float()
                rows.append(torch.log_softmax(logits / TAU, dim=-1)[keep - start :])
                if start + WINDOW >= len(tokens):
                    break
                start, keep = start + stride, start + WINDOW
    dense = torch.cat(rows)
    order = torch.sort(dense, dim=-1, descending=True, stable=True)  # ties: lower id first
    tail = torch.logsumexp(order.values[:, K:], dim=-1)
    return order.indices[:, :K].numpy(), order.values[:, :K].numpy(), tail.numpy(), order.values.numpy()


@pytest.fixture(scope="module")
def reference(setup):
    _, corpus, teacher, _ = setup
    return reference_rows(corpus, teacher)


def assert_rows_match(targets: TeacherTargets, reference, rtol: float = 1e-3, positions=None) -> None:
    """The rows of the first NREF sequences (or of ``positions``): values and tails within ``rtol``; ids exact
    wherever the reference's neighbouring values are apart by more than float noise (a near-tie may be ordered
    either way by another summation order)."""
    ref_ids, ref_logp, ref_tail, ref_sorted = reference
    ids, logp, tail = targets.rows(np.arange(len(ref_ids)) if positions is None else positions)
    assert ids.shape == ref_ids.shape
    np.testing.assert_allclose(logp, ref_logp, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(tail, ref_tail, rtol=rtol, atol=1e-5)
    gaps = np.abs(np.diff(ref_sorted[:, : K + 1], axis=-1))
    clear = np.ones_like(ref_ids, dtype=bool)
    clear[:, 1:] &= gaps[:, :-1] > 1e-5
    clear &= gaps > 1e-5
    assert clear.mean() > 0.9  # the untrained teacher is nearly uniform: near-ties are common
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])


# ---------------------------------------------------------------------------------------- unit checks
@pytest.mark.parametrize("window", [2, 3, 8, 48])
def test_windows_cover_every_token_once_with_context(window):
    sizes = np.array([0, 1, 2, 7, 8, 9, 48, 49, 100, 131])
    seq, start, end, keep = plan_windows(sizes, window)
    for s, n in enumerate(sizes):
        mine = seq == s
        kept = np.concatenate([np.arange(k, e) for k, e in zip(keep[mine], end[mine])] or [np.zeros(0, int)])
        np.testing.assert_array_equal(kept, np.arange(n))
        assert np.all(end[mine] - start[mine] <= window)
        later = np.flatnonzero(mine)[1:]
        assert np.all(keep[later] - start[later] >= window - window // 2)  # context of every later row


def test_topk_ties_take_the_lower_id_first():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    values, ids = local_topk(z, 2)
    assert ids.tolist() == [[1, 2], [0, 1]] and values.tolist() == [[3.0, 3.0], [5.0, 5.0]]
    values, ids = sort_desc_lower_id(torch.tensor([[2.0, 3.0, 2.0]]), torch.tensor([[9, 4, 1]]))
    assert ids.tolist() == [[4, 1, 9]]


# --------------------------------------------------------------------------------------- in process
def test_rows_equal_a_dense_reference(setup, reference, tmp_path):
    _, _, teacher, corpus = setup
    tool = tool_module()
    out = tmp_path / "t"
    assert tool.precompute(tool_args(corpus, teacher, out)) == 0
    targets = TeacherTargets(str(out), dataset_prefix=corpus.prefix)
    h = targets.header
    assert (h["k"], h["temperature"], h["values"], h["id_bytes"], h["vocab_size"]) == (K, TAU, "fp16", 2, 512)
    assert h["window"]["size"] == WINDOW and h["window"]["stride"] == WINDOW // 2
    assert h["tokenizer"]["vocab_size"] == 512 and h["teacher"]["family"] == "gpt2"
    assert len(targets) == IndexedDataset(corpus.prefix).num_tokens
    assert_rows_match(targets, reference, rtol=2 * FP16_RELATIVE_ERROR)
    # rerun with the same options: nothing to do, the files stay
    before = (out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes())
    assert tool.precompute(tool_args(corpus, teacher, out)) == 0
    assert (out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes()) == before


def test_int8_values_within_the_stated_error(setup, reference, tmp_path):
    _, _, teacher, corpus = setup
    tool = tool_module()
    out = tmp_path / "t8"
    assert tool.precompute(tool_args(corpus, teacher, out, "--values", "int8")) == 0
    targets = TeacherTargets(str(out))
    _, logp, _ = targets.rows(np.arange(len(targets)))
    ref_logp = reference[1]
    assert np.abs(logp - ref_logp).max() <= INT8_MAX_ERROR + 1e-5


def test_bad_options_are_one_line_naming_the_option(setup, tmp_path, capsys):
    _, _, teacher, corpus = setup
    tool = tool_module()
    cases = [
        (["--top-k", "0"], "--top-k"),
        (["--top-k", "600"], "--top-k 600"),
        (["--parallel.pipeline_parallel", "3"], "3 pipeline stages are more than the 2 layers"),
        (["--data.data_path", "0.5", corpus.prefix, "0.5", corpus.prefix], "once per prefix"),
    ]
    for extra, words in cases:
        code = tool.run_main(tool.PROG, tool.main, tool_args(corpus, teacher, tmp_path / "bad", *extra))
        err = capsys.readouterr().err.strip()
        assert code in (1, 2) and len(err.splitlines()) == 1 and words in err, (extra, err)
    with pytest.raises(TeacherTargetsError, match="not published|no such file"):
        TeacherTargets(str(tmp_path / "bad"))


def test_an_mlm_teacher_needs_a_static_mask(setup, tmp_path, capsys):
    _, _, _, corpus = setup
    bert = write_teacher(tmp_path / "bert", "tiny_bert.yaml")
    tool = tool_module()
    code = tool.run_main(tool.PROG, tool.main, tool_args(corpus, bert, tmp_path / "t"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.mask_seed" in err and "static" in err, err


# ------------------------------------------------------------------------------------ masked-LM teacher
MASK_SEED, MASK_PROB = 11, 0.3


@pytest.fixture(scope="module")
def mlm_setup(setup):
    """A tiny RoBERTa teacher (the corpus tokenizer's padding id) and its dense reference rows."""
    from megatron_ki.data import build_tokenizer

    root, _, _, small = setup
    tok = build_tokenizer("SentencePieceTokenizer", small.tokenizer)
    teacher = write_teacher(root / "roberta", "tiny_roberta.yaml", overrides={"pad_token_id": tok.pad})
    return teacher, tok, mlm_reference_rows(small, teacher, tok)


def mlm_args(corpus, teacher, out, *extra: str) -> list[str]:
    return tool_args(corpus, teacher, out, "--data.mask_seed", str(MASK_SEED), "--data.mask_prob",
                     str(MASK_PROB), *extra)  # fmt: skip


def mlm_reference_rows(corpus, teacher, tok):
    """Dense reference of a masked-LM teacher, one window at a time: ``(positions, ids, logp, tail, sorted)``
    at the positions the static mask selects, from ``[cls] masked window [sep]`` without padding."""
    from megatron_ki.convert.reshard import load_full_state
    from megatron_ki.data.static_mask import StaticMasking
    from megatron_ki.data.teacher_targets import token_base
    from megatron_ki.models import build_model

    _, cfg, full = load_full_state(teacher)
    model = build_model(cfg).eval()
    model.load_state_dict(full)
    ds = IndexedDataset(corpus.prefix)
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[list(tok.special_ids)] = True
    masking, randoms = StaticMasking(MASK_SEED, MASK_PROB), np.flatnonzero(~special)
    window, positions, rows = WINDOW - 2, [], []
    with torch.no_grad():
        for s in range(NREF):
            tokens, base = ds[s].astype(np.int64), int(token_base(ds)[s])
            start, keep = 0, 0
            while True:
                pos = np.arange(base + start, base + min(start + window, len(tokens)))
                masked, labels = masking.apply(
                    tokens[start : start + window], pos, special, tok.mask, randoms
                )
                ids = torch.tensor([[tok.cls, *masked.tolist(), tok.sep]])
                logits = model(input_ids=ids)[0, 1:-1, : cfg.vocab_size].float()
                chosen = np.flatnonzero((labels >= 0) & (pos >= base + keep))
                rows.append(torch.log_softmax(logits / TAU, dim=-1)[chosen])
                positions.append(pos[chosen])
                if start + window >= len(tokens):
                    break
                start, keep = start + window // 2, start + window
    dense = torch.cat(rows)
    order = torch.sort(dense, dim=-1, descending=True, stable=True)
    tail = torch.logsumexp(order.values[:, K:], dim=-1)
    return (np.concatenate(positions), order.indices[:, :K].numpy(), order.values[:, :K].numpy(),
            tail.numpy(), order.values.numpy())  # fmt: skip


def assert_mlm_rows_match(targets: TeacherTargets, reference) -> None:
    positions, *dense = reference
    stored = np.asarray(targets._positions)
    np.testing.assert_array_equal(stored[: len(positions)], positions)
    assert_rows_match(targets, dense, rtol=2 * FP16_RELATIVE_ERROR, positions=positions)


def test_mlm_rows_are_the_masked_positions_of_a_dense_reference(setup, mlm_setup, tmp_path):
    from megatron_ki.data.static_mask import StaticMasking, iter_masked_positions

    _, _, small = setup[0], setup[1], setup[3]
    teacher, tok, reference = mlm_setup
    tool = tool_module()
    out = tmp_path / "mlm"
    assert tool.precompute(mlm_args(small, teacher, out)) == 0
    targets = TeacherTargets(str(out), dataset_prefix=small.prefix)
    masking = targets.header["masking"]
    assert (masking["seed"], masking["mask_prob"], masking["scheme"]) == (
        MASK_SEED,
        MASK_PROB,
        "position-hash-v1",
    )
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[list(tok.special_ids)] = True
    every = np.concatenate(list(iter_masked_positions(IndexedDataset(small.prefix), StaticMasking(MASK_SEED,
                                                                                                  MASK_PROB), special)))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(targets._positions), every)  # rows only where the mask selects
    tokens = IndexedDataset(small.prefix).num_tokens
    assert abs(len(targets) / tokens - MASK_PROB) < 0.05 and len(reference[0]) == len(targets)
    assert_mlm_rows_match(targets, reference)
    with pytest.raises(TeacherTargetsError, match="no row: the student's static mask differs"):
        targets.rows(np.setdiff1d(np.arange(200), every)[:3])


def test_mlm_interrupted_precompute_resumes_to_the_same_files(setup, mlm_setup, tmp_path):
    """Stopped after writing a chunk's rows and positions but before recording it, then rerun: the same bytes."""
    _, _, _, small = setup
    teacher = mlm_setup[0]
    tool = tool_module()
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert tool.precompute(mlm_args(small, teacher, whole)) == 0

    def stop(chunk: int) -> None:
        if chunk >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tool.precompute(mlm_args(small, teacher, cut), on_chunk_written=stop)
    assert not Path(f"{cut}.idx").exists() and not Path(f"{cut}.pos").exists()
    with pytest.raises(TeacherTargetsError, match="not published"):
        TeacherTargets(str(cut))
    assert tool.precompute(mlm_args(small, teacher, cut)) == 0
    for suffix in (".idx", ".bin", ".pos"):
        assert Path(f"{cut}{suffix}").read_bytes() == Path(f"{whole}{suffix}").read_bytes(), suffix
    assert not Path(f"{cut}.progress").exists() and not Path(f"{cut}.pos.tmp").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_mlm_tp2_and_pp2_equal_the_reference(setup, mlm_setup, tmp_path, layout):
    _, _, _, small = setup
    teacher, _, reference = mlm_setup
    out = tmp_path / layout
    option = "--parallel.tensor_parallel" if layout == "tp2" else "--parallel.pipeline_parallel"
    assert run_distributed(_precompute_on_ranks, 2, (mlm_args(small, teacher, out, option, "2"),)) == [0, 0]
    assert_mlm_rows_match(TeacherTargets(str(out), small.prefix), reference)


# ------------------------------------------------------------------------------------- pipeline stages
def resharded_teacher(teacher: Path, out: Path, tp: int, pp: int) -> Path:
    """The test teacher saved again at ``tp`` x ``pp`` (a pipeline checkpoint: one file per layer and rank)."""
    from megatron_ki.config import Config
    from megatron_ki.convert.reshard import load_full_state, write_checkpoint

    _, cfg, full = load_full_state(teacher)
    write_checkpoint(full, Config(model=cfg), out, tp=tp, pp=pp, tag="teacher")
    return out


def hf_teacher(teacher: Path, out: Path, tokenizer: str) -> str:
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint_tool", ROOT / "tools" / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.export_hf(teacher, out, tokenizer_model=tokenizer, dtype="float32", progress=False)
    return f"hf:{out}"


@pytest.mark.parametrize("source", ["pp1", "tp2pp2", "hf"])
def test_a_stage_builds_and_reads_only_its_layers(setup, tmp_path, monkeypatch, source):
    """At pp = 2 each stage builds only its modules (every model built on a stage counted) and reads only its
    tensors from the teacher's files; stage 0 then stage 1 give the whole teacher's logits."""
    from megatron_ki.models import stage as stage_module
    from megatron_ki.parallel import ParallelGroups, Topology

    _, _, teacher, corpus = setup
    path = {
        "pp1": lambda: str(teacher),
        "tp2pp2": lambda: str(resharded_teacher(teacher, tmp_path / "ckpt", 2, 2)),
        "hf": lambda: hf_teacher(teacher, tmp_path / "hf", corpus.tokenizer),
    }[source]()
    tool = tool_module()
    s = tool.resolve(tool_args(corpus, path, tmp_path / "t", "--parallel.pipeline_parallel", "2"))
    whole = tool.load_teacher(s, ParallelGroups.single(), torch.device("cpu"))
    whole_count = sum(p.numel() for p in whole.parameters())
    built, read, stages = [], [], []
    real_build, real_source = stage_module.build_model, tool.teacher_source

    def counting_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append(sum(p.numel() for p in model.parameters()))
        return model

    def recording_source(settings):
        cfg, state = real_source(settings)
        state.on_load = read.append
        return cfg, state

    monkeypatch.setattr(stage_module, "build_model", counting_build)
    monkeypatch.setattr(tool, "teacher_source", recording_source)
    for stage in range(2):
        built.clear(), read.clear()
        model = tool.load_teacher(s, ParallelGroups(Topology(1, 2, 1), stage), torch.device("cpu"))
        stages.append(model)
        assert model.layer_range == ((0, 1) if stage == 0 else (1, 2))
        assert (model.embedding is not None, model.head is not None) == (stage == 0, stage == 1)
        assert sum(built) == sum(p.numel() for p in model.parameters()) < whole_count
        layers = {n.split(".")[1] for n in read if n.startswith("layers.")}
        assert layers == {str(stage)}, read  # only this stage's block
        assert any(n.startswith("embedding.word_embeddings") for n in read)  # stage 1: the tied head's copy
        assert stage == 1 or not any(n.startswith("head.") for n in read)
    ids = torch.from_numpy(IndexedDataset(corpus.prefix)[0][:WINDOW].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(
            stages[1](hidden_states=stages[0](input_ids=ids)), whole(input_ids=ids), rtol=0, atol=0
        )


def _precompute_on_ranks(rank: int, world: int, args: list[str]) -> int:
    return tool_module().precompute(args)


@pytest.mark.distributed
def test_tp2_equals_the_reference_to_float_rounding(setup, reference, tmp_path):
    """Two gloo ranks holding half the teacher each: per-rank top-K, all-gathered, global top-K and tail."""
    _, _, teacher, corpus = setup
    out = tmp_path / "tp2"
    args = tool_args(corpus, teacher, out, "--parallel.tensor_parallel", "2")
    assert run_distributed(_precompute_on_ranks, 2, (args,)) == [0, 0]
    assert_rows_match(TeacherTargets(str(out), corpus.prefix), reference, rtol=2 * FP16_RELATIVE_ERROR)


# --------------------------------------------------------------------------------- under the launcher
def launch_tool(world: int, corpus, teacher, out: Path, *extra: str, entry: Path = TOOL):
    args = ["--config", str(CONFIGS / "tiny_gpt2.yaml"), *tool_args(corpus, teacher, out, *extra)]
    return launch(world, args, out.parent, script=SCRIPT, env={"ENTRY": str(entry)}, timeout=300)


KILL_ENTRY = """
import os, signal, sys
sys.path.insert(0, {tools!r})
import precompute_teacher as tool

def kill(chunk):
    if chunk >= {at}:  # this chunk's rows are written, its record is not: like kill -9 mid-run
        os.kill(os.getpid(), signal.SIGKILL)

code = tool.run_main(tool.PROG, lambda argv: tool.main(argv, kill))
os._exit(code)
"""


def files_of(out: Path) -> tuple[bytes, bytes]:
    return out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes()


@pytest.fixture(scope="module")
def launched_dp1(setup):
    root, corpus, teacher, _ = setup
    out = root / "dp1" / "t"
    out.parent.mkdir()
    run = launch_tool(1, corpus, teacher, out)
    assert run.returncode == 0, run.tail()
    return out


@pytest.mark.distributed
def test_launcher_dp2_equals_dp1_byte_for_byte(setup, reference, launched_dp1):
    root, corpus, teacher, _ = setup
    assert_rows_match(
        TeacherTargets(str(launched_dp1), corpus.prefix), reference, rtol=2 * FP16_RELATIVE_ERROR
    )
    out = root / "dp2" / "t"
    out.parent.mkdir()
    run = launch_tool(2, corpus, teacher, out)
    assert run.returncode == 0, run.tail()
    assert files_of(out) == files_of(launched_dp1)


@pytest.mark.distributed
@pytest.mark.slow
def test_launcher_tp2_equals_tp1_to_float_rounding(setup, reference, launched_dp1):
    root, corpus, teacher, _ = setup
    out = root / "tp2" / "t"
    out.parent.mkdir()
    run = launch_tool(2, corpus, teacher, out, "--parallel.tensor_parallel", "2")
    assert run.returncode == 0, run.tail()
    tp2, tp1 = TeacherTargets(str(out)), TeacherTargets(str(launched_dp1))
    assert tp2.header == tp1.header
    assert_rows_match(tp2, reference, rtol=2 * FP16_RELATIVE_ERROR)


@pytest.mark.distributed
def test_launcher_pp2_equals_pp1(setup, launched_dp1):
    """Two stages of one layer each, hidden states sent stage to stage: the same operations in the same order
    as pp = 1 on the same shapes, so the same header and rows byte for byte (stated tolerance: float
    rounding; on this CPU it is none, as for dp = 2)."""
    root, corpus, teacher, _ = setup
    out = root / "pp2" / "t"
    out.parent.mkdir()
    run = launch_tool(2, corpus, teacher, out, "--parallel.pipeline_parallel", "2")
    assert run.returncode == 0, run.tail()
    assert TeacherTargets(str(out)).header == TeacherTargets(str(launched_dp1)).header
    assert files_of(out) == files_of(launched_dp1)


@pytest.mark.distributed
@pytest.mark.slow
def test_launcher_tp2_pp2_from_a_pipeline_checkpoint_equals_pp1(setup, reference, launched_dp1):
    """Four ranks (tp = 2 x pp = 2) over the teacher saved at tp = 2 x pp = 2; the header names the teacher's
    path, so only it differs from pp = 1's."""
    root, corpus, teacher, _ = setup
    saved = resharded_teacher(teacher, root / "teacher_tp2pp2", 2, 2)
    out = root / "tp2pp2" / "t"
    out.parent.mkdir()
    run = launch_tool(
        4, corpus, saved, out, "--parallel.tensor_parallel", "2", "--parallel.pipeline_parallel", "2"
    )
    assert run.returncode == 0, run.tail()
    got, want = TeacherTargets(str(out)), TeacherTargets(str(launched_dp1))
    assert got.header["teacher"]["path"] == str(saved)
    assert {**got.header, "teacher": None} == {**want.header, "teacher": None}
    assert got.header["teacher"]["config_sha256"] == want.header["teacher"]["config_sha256"]
    assert_rows_match(got, reference, rtol=2 * FP16_RELATIVE_ERROR)


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_9_during_the_precompute_then_rerun_gives_identical_files(setup, launched_dp1, tmp_path):
    root, corpus, teacher, _ = setup
    out = root / "killed" / "t"
    out.parent.mkdir()
    entry = tmp_path / "kill_entry.py"
    entry.write_text(KILL_ENTRY.format(tools=str(ROOT / "tools"), at=5))
    run = launch_tool(2, corpus, teacher, out, entry=entry)
    assert run.returncode != 0, run.tail()
    assert not out.with_suffix(".idx").exists()
    with pytest.raises(TeacherTargetsError, match="not published"):
        TeacherTargets(str(out))
    done = [n for n in os.listdir(f"{out}.progress") if n.endswith(".done")]
    assert 0 < len(done) < TeacherTargets(str(launched_dp1)).header["chunking"]["num_chunks"]
    run = launch_tool(2, corpus, teacher, out)
    assert run.returncode == 0, run.tail()
    assert "resume run" in run.output
    assert files_of(out) == files_of(launched_dp1)
    assert not Path(f"{out}.progress").exists() and not Path(f"{out}.bin.tmp").exists()
