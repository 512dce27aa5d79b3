"""Framework checkpoints at any tp/pp read back into the single-process model's full state dict, and write
out at any other tp/pp; the teacher is never in a student checkpoint."""

import json
import os

import pytest
import torch

from megatron_ki.checkpoint_format import CheckpointError, read_latest
from megatron_ki.config import Config, load_config
from megatron_ki.convert.reshard import (
    load_full_state,
    shard_state_dict,
    tp_layout,
    unshard_state_dicts,
    write_checkpoint,
)
from megatron_ki.models import build_model
from tests.distributed import run_distributed

CONFIGS = "launch/configs/models"


def _config(family: str, **model) -> Config:
    cfg = load_config(f"{CONFIGS}/tiny_{family}.yaml")
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_unshard_round_trip(family, tp):
    cfg = _config(family, num_key_value_heads=4 if family == "llama" else None)
    full = build_model(cfg.model, seed=3).state_dict()
    shards = [shard_state_dict(full, cfg.model, tp, r) for r in range(tp)]
    for shard in shards:  # each shard is what the tp-rank model holds
        assert set(shard) == set(full)
    again = unshard_state_dicts(shards, cfg.model)
    for name, value in full.items():
        rows = value.shape[0]
        torch.testing.assert_close(again[name][:rows], value, rtol=0, atol=0, msg=name)


def test_layout_marks_fused_segments():
    cfg = _config("llama")
    layout = tp_layout(cfg.model)
    h, kv = cfg.model.hidden_size, cfg.model.kv_heads * cfg.model.head_dim
    assert layout["layers.0.attention.qkv.weight"] == (0, [h, kv, kv])
    assert layout["layers.0.mlp.fc1.weight"] == (0, [cfg.model.ffn_size, cfg.model.ffn_size])
    assert layout["layers.0.attention.dense.weight"][0] == 1
    assert layout["layers.0.attn_norm.weight"] is None


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_write_then_load_any_layout(tmp_path, tp, pp):
    cfg = _config("gpt2")
    full = build_model(cfg.model, seed=5).state_dict()
    write_checkpoint(full, cfg, tmp_path, tp=tp, pp=pp, tag="converted")
    assert read_latest(tmp_path) == "converted"
    meta, model_cfg, loaded = load_full_state(tmp_path)
    assert meta["layout"] == {"tp": tp, "pp": pp, "dp": 1, "zero_stage": 0}
    assert model_cfg == cfg.model
    assert set(loaded) == set(full)
    for name, value in full.items():
        torch.testing.assert_close(loaded[name][: value.shape[0]], value, rtol=0, atol=0, msg=name)


def test_refusals_leave_nothing(tmp_path):
    cfg = _config("gpt2")
    full = build_model(cfg.model, seed=5).state_dict()
    with pytest.raises(CheckpointError, match="tensor_parallel=3 does not divide heads"):
        write_checkpoint(full, cfg, tmp_path / "out", tp=3, pp=1)
    with pytest.raises(CheckpointError, match="more than the model's 2 layers"):
        write_checkpoint(full, cfg, tmp_path / "out", tp=1, pp=4)
    broken = dict(full)
    del broken["layers.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointError, match="has no 'layers.1.mlp.fc2.weight'"):
        write_checkpoint(broken, cfg, tmp_path / "out", tp=2, pp=1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_full_state(tmp_path / "missing")


def _save_worker(rank, world, tp, pp, root):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_ki.ki.teacher import KILossFunction
    from megatron_ki.models.pipe import PipelinedTeacher
    from megatron_ki.parallel import ParallelGroups, Topology
    from megatron_ki.training.checkpoint import save_checkpoint
    from megatron_ki.training.ds_config import deepspeed_config
    from megatron_ki.training.engine import initialize_engine
    from megatron_ki.training.run import build_pipeline_module

    cfg = load_config(
        f"{CONFIGS}/tiny_gpt2.yaml",
        [
            "--parallel.tensor_parallel", str(tp), "--parallel.pipeline_parallel", str(pp),
            "--checkpoint.save", root, "--ki.enabled", "true", "--ki.teacher_path", "unused",
        ],
    )  # fmt: skip
    groups = ParallelGroups.build(Topology.from_world(world, tp=tp, pp=pp))
    pipe_teacher = PipelinedTeacher(cfg.model, seed=99, dtype="float32")
    module = build_pipeline_module(
        cfg.model, groups.topology, groups, seed=7, loss_fn=KILossFunction(cfg.ki), pipe_teacher=pipe_teacher
    )
    engine = initialize_engine(cfg, module, groups, deepspeed_config(cfg, world))
    save_checkpoint(engine, cfg, groups, step=3, consumed_samples=12)
    return groups.rank


@pytest.mark.distributed
def test_deepspeed_pipeline_checkpoint_reads_as_single_model(tmp_path):
    """A checkpoint the real engine saved at tp=2 x pp=2 equals the single-process model with the same seed."""
    root = str(tmp_path / "ckpt")
    run_distributed(_save_worker, 4, args=(2, 2, root))
    assert read_latest(root) == "step00000003"
    assert not list(tmp_path.glob("ckpt/*.tmp"))
    meta, cfg, full = load_full_state(root)
    assert meta["step"] == 3 and meta["consumed_samples"] == 12
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    expected = build_model(cfg, seed=7).state_dict()
    assert set(full) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value, rtol=0, atol=0, msg=name)
    # the teacher (pipe_teacher, seed 99) is not in any file of the checkpoint
    teacher = build_model(cfg, seed=99).state_dict()["layers.0.mlp.fc1.weight"]
    for path in (tmp_path / "ckpt" / "step00000003").glob("*model_states.pt"):
        blob = torch.load(path, weights_only=False)
        tensors = blob.get("module") or blob if isinstance(blob, dict) else {}
        for value in (tensors or {}).values():
            if isinstance(value, torch.Tensor) and value.shape[-1] == teacher.shape[-1] and value.dim() == 2:
                assert not any(torch.equal(value, part) for part in teacher.chunk(2, 0))
    assert json.loads((tmp_path / "ckpt" / "step00000003" / "meta.json").read_text())["format_version"] == 1


def test_checkpoint_directories_follow_the_umask(tmp_path):
    """Converted checkpoints get the mode of any directory the user makes (0755 under umask 022), not 0700."""
    cfg = _config("gpt2")
    full = build_model(cfg.model, seed=5).state_dict()
    old = os.umask(0o022)
    try:
        write_checkpoint(full, cfg, tmp_path / "ckpt", tp=1, pp=1, tag="converted")
    finally:
        os.umask(old)
    assert oct((tmp_path / "ckpt" / "converted").stat().st_mode & 0o777) == oct(0o755)
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []
