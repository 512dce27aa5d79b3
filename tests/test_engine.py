"""The DeepSpeed engine built by the framework trains a tensor-parallel MLP identically at every layout."""

import os
from pathlib import Path

import pytest
import torch

from megatron_ki.config import config_from_dict
from megatron_ki.parallel import ParallelGroups, Topology
from megatron_ki.training.ds_config import deepspeed_config
from megatron_ki.training.engine import initialize_engine, param_groups
from tests.distributed import run_distributed

STEPS = 3
GLOBAL_BATCH = 8


class _TPMLP(torch.nn.Module):
    def __init__(self, group):
        from megatron_ki.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        torch.manual_seed(0)
        self.up = ColumnParallelLinear(16, 32, group)
        self.down = RowParallelLinear(32, 4, group)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.down(torch.nn.functional.gelu(self.up(x))))


def _engine_worker(rank, world, tp, zero, precision):
    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = config_from_dict(
        {
            "parallel": {"tensor_parallel": tp},
            "train": {
                "micro_batch_size": 2,
                "global_batch_size": GLOBAL_BATCH,
                "zero_stage": zero,
                "precision": precision,
                "train_steps": STEPS,
            },
            "optim": {"lr": 1e-2, "lr_warmup_fraction": 0.0},
        }
    )
    cfg.validate(world)
    groups = ParallelGroups.build(Topology.from_world(world, tp=tp))
    model = _TPMLP(groups.tp_group)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    engine = initialize_engine(cfg, model, groups, deepspeed_config(cfg, world))
    gen = torch.Generator().manual_seed(1)
    # The same batch every step, so the loss must fall.
    data = torch.randn(1, GLOBAL_BATCH, 16, generator=gen).expand(STEPS, -1, -1)
    target = torch.randn(1, GLOBAL_BATCH, 4, generator=gen).expand(STEPS, -1, -1)
    dp, dp_rank, micro = groups.topology.dp, groups.dp_rank, 2
    losses = []
    for step in range(STEPS):
        per_rank = GLOBAL_BATCH // dp
        x = data[step, dp_rank * per_rank : (dp_rank + 1) * per_rank]
        y = target[step, dp_rank * per_rank : (dp_rank + 1) * per_rank]
        total = torch.zeros(())
        for m in range(per_rank // micro):
            xb = x[m * micro : (m + 1) * micro].to(model.up.weight.dtype)
            out = engine(xb)
            loss = torch.nn.functional.mse_loss(out.float(), y[m * micro : (m + 1) * micro])
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        torch.distributed.all_reduce(total, group=groups.data)
        losses.append(total.item() / (GLOBAL_BATCH // micro))
    return losses


@pytest.fixture(scope="module")
def engine_reference():
    return run_distributed(_engine_worker, 1, args=(1, 0, "fp32"))[0]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,tp,zero",
    [(2, 2, 0), (2, 1, 1), (2, 1, 2)],
)
def test_engine_layouts_match_single_process(world, tp, zero, engine_reference):
    reference = engine_reference
    results = run_distributed(_engine_worker, world, args=(tp, zero, "fp32"))
    for losses in results:
        assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert reference[-1] < reference[0]  # it trains


def test_weight_decay_groups():
    model = _TPMLP(None)
    groups = param_groups(model, 0.01)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model.up.weight), id(model.down.weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4


def _shm_worker(rank, world):
    import deepspeed

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(world))  # as the deepspeed launcher sets it
    deepspeed.init_distributed(dist_backend="gloo")
    port = os.environ["MASTER_PORT"]
    created = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}").exists()
    cfg = config_from_dict({"train": {"micro_batch_size": 2, "global_batch_size": 4, "train_steps": 1}})
    groups = ParallelGroups.build(Topology.from_world(world))
    initialize_engine(cfg, _TPMLP(None), groups, deepspeed_config(cfg, world))
    return port, created


@pytest.mark.distributed
def test_deepspeed_shm_workspaces_are_released():
    """DeepSpeed's CPU comm op leaves one /dev/shm workspace per rank; the engine set-up unlinks them."""
    results = run_distributed(_shm_worker, 2)
    port = results[0][0]
    if not any(created for _, created in results):
        pytest.skip("DeepSpeed's shared-memory comm op is not active on this machine")
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {left}"


def test_sequence_parallel_keeps_deepspeed_from_splitting_the_chunks(tmp_path: Path) -> None:
    """With sequence parallelism each TP rank's pipeline activation is its own sequence chunk: the generated
    DeepSpeed config turns DeepSpeed's activation partitioning off, and a user JSON turning it on is refused."""
    from megatron_ki.config import ConfigError, load_config

    args = ["--parallel.tensor_parallel", "2", "--parallel.pipeline_parallel", "2"]
    cfg = load_config("launch/configs/models/tiny_gpt2.yaml", [*args, "--parallel.sequence_parallel", "true"])
    assert deepspeed_config(cfg, 4)["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert "pipeline" not in deepspeed_config(load_config("launch/configs/models/tiny_gpt2.yaml", args), 4)
    user = tmp_path / "ds.json"
    user.write_text('{"activation_checkpointing": {"partition_activations": true}}')
    cfg.train.deepspeed_config = str(user)
    with pytest.raises(ConfigError, match="partition_activations true, which does not go with") as info:
        deepspeed_config(cfg, 4)
    assert info.value.key == "train.deepspeed_config"
