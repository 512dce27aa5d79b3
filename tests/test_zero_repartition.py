"""ZeRO 1/2 checkpoints resume at another data-parallel size with exactly the saved optimizer state.

A tensor-parallel MLP trains a few steps under ZeRO at dp=2 (different data per rank, so every slice of the
optimizer state differs) and is saved; engines at dp=1 and dp=3 (an uneven split of the flat groups) load it.
Every parameter's fp32 master weight, Adam moments and step, gathered through DeepSpeed's public
``safe_get_full_*`` API, must equal the saved ones bitwise - it is a copy, nothing is recomputed. The bf16
case shows the fp32 master weights come from the checkpoint, not from the bf16 weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_ki.config import config_from_dict
from megatron_ki.parallel import ParallelGroups, Topology
from megatron_ki.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_ki.training.ds_config import deepspeed_config
from megatron_ki.training.engine import initialize_engine
from tests.distributed import run_distributed
from tests.test_engine import _TPMLP

pytestmark = pytest.mark.distributed

GLOBAL_BATCH, MICRO, STEPS = 12, 2, 3
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _engine(world: int, tp: int, zero: int, precision: str, ckpt: str):
    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = config_from_dict(
        {
            "parallel": {"tensor_parallel": tp},
            "train": {
                "micro_batch_size": MICRO,
                "global_batch_size": GLOBAL_BATCH,
                "zero_stage": zero,
                "precision": precision,
                "train_steps": 10,
            },
            "optim": {"lr": 1e-2, "lr_warmup_fraction": 0.2},
            "checkpoint": {"save": ckpt, "load": ckpt},
        }
    )
    cfg.validate(world)
    groups = ParallelGroups.build(Topology.from_world(world, tp=tp))
    model = _TPMLP(groups.tp_group)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return cfg, groups, model, initialize_engine(cfg, model, groups, deepspeed_config(cfg, world))


def _snapshot(engine, model, groups) -> dict:
    """Every parameter's full optimizer state (collective over the data-parallel group)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed links the Adam-moment fragments once, right after the first group's first step, when the other
    # groups have no state yet; link them again so that every group's moments can be read.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {"tp_rank": groups.tp_rank, "lr": [g["lr"] for g in engine.optimizer.optimizer.param_groups]}
    for name, p in model.named_parameters():
        out[name] = {"fp32": safe_get_full_fp32_param(p).clone()}
        out[name].update({k: safe_get_full_optimizer_state(p, k).clone() for k in STATE_KEYS})
    opt_state = engine.optimizer.optimizer.state
    out["adam_step"] = sorted({(float(s["step"]), tuple(s["step"].shape)) for s in opt_state.values()})
    return out


def _save_worker(rank, world, tp, zero, precision, ckpt):
    cfg, groups, model, engine = _engine(world, tp, zero, precision, ckpt)
    gen = torch.Generator().manual_seed(7 + groups.dp_rank)  # each data-parallel rank sees other data
    for _ in range(STEPS * GLOBAL_BATCH // (MICRO * groups.topology.dp)):
        x = torch.randn(MICRO, 16, generator=gen).to(model.up.weight.dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), torch.randn(MICRO, 4, generator=gen))
        engine.backward(loss)
        engine.step()
    save_checkpoint(engine, cfg, groups, step=STEPS, consumed_samples=STEPS * GLOBAL_BATCH)
    return _snapshot(engine, model, groups)


def _load_worker(rank, world, tp, zero, precision, ckpt):
    cfg, groups, model, engine = _engine(world, tp, zero, precision, ckpt)
    meta = load_checkpoint(engine, cfg, groups)
    assert meta is not None and meta["step"] == STEPS
    return _snapshot(engine, model, groups)


def _by_tp_rank(snapshots: list[dict]) -> dict[int, dict]:
    return {s["tp_rank"]: s for s in snapshots}


# (tp, zero, precision, dp sizes to resume at); saved at dp=2
CASES = [(1, 1, "fp32", (1, 3)), (1, 2, "bf16", (3,)), (2, 2, "fp32", (1,))]


@pytest.mark.parametrize("tp,zero,precision,resume_dps", CASES, ids=lambda v: str(v))
def test_zero_state_resumes_at_other_data_parallel_size(tmp_path: Path, tp, zero, precision, resume_dps):
    ckpt = str(tmp_path / "ckpt")
    saved = _by_tp_rank(run_distributed(_save_worker, 2 * tp, args=(tp, zero, precision, ckpt)))
    assert saved[0]["adam_step"] == [(float(STEPS), ())]
    for dp in resume_dps:
        loaded = _by_tp_rank(run_distributed(_load_worker, dp * tp, args=(tp, zero, precision, ckpt)))
        for tp_rank, want in saved.items():
            got = loaded[tp_rank]
            assert got["adam_step"] == want["adam_step"], f"dp=2 -> {dp}: Adam step"
            assert got["lr"] == want["lr"], f"dp=2 -> {dp}: learning rates of the param groups"
            for name, tensors in want.items():
                if not isinstance(tensors, dict):
                    continue
                for key, value in tensors.items():
                    assert torch.equal(got[name][key], value), (
                        f"dp=2 -> {dp}, tp rank {tp_rank}: {name}.{key}"
                    )
        if precision == "bf16":
            fp32 = saved[0]["up.weight"]["fp32"]
            assert not torch.equal(fp32, fp32.bfloat16().float()), "the fp32 master should carry extra bits"
