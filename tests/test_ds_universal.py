"""DeepSpeed's own ``ds_to_universal`` converts our ZeRO checkpoints without extra flags, and the universal
checkpoint resumes at another tensor/data-parallel layout with exactly the saved weights.

A tiny Llama (grouped-query fused QKV and SwiGLU gate/up, both interleaved per tensor-parallel rank; a
vocabulary of 500 padded to 512 at tp=2 and to 504 at tp=1; row-parallel and replicated parameters) trains
two ZeRO-1 steps at tp=2 and is saved. ``python -m deepspeed.checkpoint.ds_to_universal`` (no flags) must then
write every parameter's fp32 master weight equal (bitwise, tolerance 0) to the saved one rebuilt at tp=1 with
the framework's own resharding, vocabulary padding stripped. An engine at tp=1, dp=2 loads it through
``checkpoint.load_universal`` and must hold the same weights (bitwise) and resume at the saved step (slow:
a second distributed run). DeepSpeed's ``zero_to_fp32.py`` beside the tp=2 checkpoint says to use
``tools/convert_checkpoint.py --weights master`` instead of failing with a misleading message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ki.config import ConfigError, config_from_dict, load_config
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 500
STEPS = 2


def _cfg(tp: int, ckpt: str, run_dir: str, universal: bool = False, pp: int = 1):
    return load_config(
        str(ROOT / "launch/configs/models/tiny_llama.yaml"),
        [
            "--model.vocab_size", str(VOCAB),
            "--parallel.tensor_parallel", str(tp),
            "--parallel.pipeline_parallel", str(pp),
            "--train.zero_stage", "1",
            "--train.micro_batch_size", "1",
            "--train.global_batch_size", "2",
            "--data.seq_length", "8",
            "--optim.lr", "1e-2",
            "--checkpoint.save", ckpt,
            "--checkpoint.load", ckpt,
            "--checkpoint.load_universal", str(universal).lower(),
            "--logging.run_dir", run_dir,
        ],
    )  # fmt: skip


def _batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, VOCAB, (1, 9), generator=gen)
        yield (
            (ids[:, :-1], torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)),
            ids[:, 1:],
        )


def _full_weights(module, groups, cfg) -> dict[str, torch.Tensor]:
    """The tp=1 weights of ``module`` (gathered over the tensor-parallel group), vocabulary padding stripped."""
    import torch.distributed as dist

    from megatron_ki.convert.reshard import _is_vocab, unshard_state_dicts

    local = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    shards: list = [local]
    if groups.topology.tp > 1:
        shards = [None] * groups.topology.tp
        dist.all_gather_object(shards, local, group=groups.tp_group)
    full = unshard_state_dicts(shards, cfg.model)
    return {n: t[: cfg.model.vocab_size] if _is_vocab(n) else t for n, t in full.items()}


def _save_worker(rank, world, ckpt, run_dir, pp=1):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_ki.training.checkpoint import save_checkpoint
    from megatron_ki.training.loop import Trainer
    from megatron_ki.training.run import build_run

    cfg = _cfg(2 // pp, ckpt, run_dir, pp=pp)
    cfg.checkpoint.load = None
    run = build_run(cfg, world, data=False)
    trainer = Trainer(run)
    data = _batches(seed=3 + run.groups.dp_rank)
    for _ in range(STEPS):
        trainer.train_step(data)
    save_checkpoint(run.engine, cfg, run.groups, STEPS, STEPS * 2)
    if pp == 1:
        return _full_weights(run.engine.module, run.groups, cfg)
    # tp = 1: this stage's parameters under the names the pipeline module gives them, padding stripped
    local = {n: p.detach().float().clone() for n, p in run.engine.module.named_parameters()}
    vocab = ("word_embeddings.weight", "head.output.weight")  # behind the stage's layer index
    return {n: t[: cfg.model.vocab_size] if n.endswith(vocab) else t for n, t in local.items()}


def _to_universal(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    tag = f"step{STEPS:08d}"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag)]
    return subprocess.run(
        [*cmd, "--output_folder", str(out / tag)],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        timeout=300,
    )


def _load_worker(rank, world, ckpt, run_dir, pp=1):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_ki.training.run import build_run

    cfg = _cfg(1, ckpt, run_dir, universal=True, pp=pp)
    run = build_run(cfg, world, data=False)
    assert run.resumed is not None and run.resumed["step"] == STEPS
    assert run.resumed["consumed_samples"] == STEPS * 2
    if pp == 1:
        return _full_weights(run.engine.module, run.groups, cfg)
    return {n: p.detach().float().clone() for n, p in run.engine.module.named_parameters()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tp=2 ZeRO-1 checkpoint, its tp=1 weights, and DeepSpeed's ds_to_universal run on it (no flags)."""
    root = tmp_path_factory.mktemp("universal")
    ckpt, universal = root / "ckpt", root / "universal"
    saved = run_distributed(_save_worker, 2, args=(str(ckpt), str(root / "run")))[0]
    return root, saved, _to_universal(ckpt, universal)


@pytest.mark.distributed
def test_ds_to_universal_converts_a_pipeline_checkpoint(tmp_path: Path):
    """pp=2: each stage's parameters (the tied embedding's last-stage copy included) come out exactly."""
    ckpt, universal = tmp_path / "ckpt", tmp_path / "universal"
    stages = run_distributed(_save_worker, 2, args=(str(ckpt), str(tmp_path / "run"), 2))
    done = _to_universal(ckpt, universal)
    assert done.returncode == 0, done.stderr[-3000:]
    names = set()
    for stage in stages:
        for name, want in stage.items():
            got = torch.load(universal / f"step{STEPS:08d}" / "zero" / name / "fp32.pt", weights_only=False)
            assert got["param"].shape == want.shape and torch.equal(got["param"], want), name
            names.add(name)
    assert len(names) == sum(len(s) for s in stages) and any("qkv" in n for n in names)
    loaded = run_distributed(_load_worker, 2, args=(str(universal), str(tmp_path / "run2"), 2))
    for stage, got in zip(stages, loaded, strict=True):  # resumed at pp=2: the same weights, padding restored
        assert set(got) == set(stage)
        for name, want in stage.items():
            assert torch.equal(got[name][: want.shape[0]], want), name


@pytest.mark.distributed
def test_ds_to_universal_converts_our_checkpoint(converted):
    root, saved, done = converted
    assert done.returncode == 0, done.stderr[-3000:]
    universal, tag = root / "universal", f"step{STEPS:08d}"
    assert (universal / "latest_universal").read_text().strip() == tag
    for name, want in saved.items():
        got = torch.load(universal / tag / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert got.shape == want.shape and torch.equal(got, want), name
    qkv = saved["layers.0.attention.qkv.weight"]  # [q 64 | k 32 | v 32] rows: a wrong merge swaps them
    assert qkv.shape[0] == 128 and not torch.equal(qkv[:64], qkv[64:])


@pytest.mark.distributed
def test_zero_to_fp32_beside_a_tensor_parallel_checkpoint_names_the_tool(converted):
    root, _, _ = converted
    script = root / "ckpt" / "zero_to_fp32.py"
    done = subprocess.run(
        [sys.executable, str(script), str(root / "ckpt"), str(root / "out")], capture_output=True, text=True
    )
    assert done.returncode == 1 and "tools/convert_checkpoint.py --weights master" in done.stderr, done.stderr
    assert "tensor_parallel=2" in done.stderr and not (root / "out").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_universal_checkpoint_resumes_at_another_layout(converted):
    root, saved, done = converted
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = run_distributed(_load_worker, 2, args=(str(root / "universal"), str(root / "run2")))
    for got in loaded:  # tp=1, dp=2: both data-parallel ranks hold the whole model
        assert set(got) == set(saved)
        for name, want in saved.items():
            assert torch.equal(got[name], want), name


def test_load_universal_needs_zero(tmp_path: Path):
    from megatron_ki.training.ds_config import deepspeed_config

    cfg = config_from_dict({"checkpoint": {"load": str(tmp_path), "load_universal": True}})
    with pytest.raises(ConfigError, match="checkpoint.load_universal.*zero_stage"):
        deepspeed_config(cfg, 1)
    cfg.train.zero_stage = 1
    assert deepspeed_config(cfg, 1)["checkpoint"] == {"load_universal": True}
