"""Topology: the same ranks form the same groups as DeepSpeed's PipeModelDataParallelTopology."""

import pytest
import torch
import torch.distributed as dist

from megatron_ki.parallel import ParallelGroups, Topology, TopologyError
from tests.distributed import run_distributed

LAYOUTS = [(2, 1, 2), (1, 2, 2), (2, 2, 1), (1, 1, 4), (2, 2, 2)]


def _sorted(groups):
    return sorted(sorted(g) for g in groups)


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_groups_match_deepspeed(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = Topology(tp=tp, pp=pp, dp=dp)
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    assert _sorted(topo.tensor_groups()) == _sorted(
        ds.get_axis_comm_lists("model") or [[r] for r in range(topo.world_size)]
    )
    assert _sorted(topo.pipeline_groups()) == _sorted(
        ds.get_axis_comm_lists("pipe") or [[r] for r in range(topo.world_size)]
    )
    assert _sorted(topo.data_groups()) == _sorted(
        ds.get_axis_comm_lists("data") or [[r] for r in range(topo.world_size)]
    )
    for rank in range(topo.world_size):
        c = ds.get_coord(rank)
        assert topo.coord(rank) == (c.pipe, c.data, c.model)
        assert topo.rank(*topo.coord(rank)) == rank
    assert _sorted(topo.to_deepspeed().get_axis_comm_lists("pipe")) == _sorted(ds.get_axis_comm_lists("pipe"))


def test_embedding_and_model_parallel_groups():
    topo = Topology(tp=2, pp=2, dp=2)
    # ranks: pipe*4 + data*2 + tensor
    assert _sorted(topo.embedding_groups()) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert _sorted(topo.model_parallel_groups()) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert _sorted(Topology(2, 1, 2).embedding_groups()) == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "world,tp,pp,message",
    [
        (4, 3, 1, "does not divide the world size 4"),
        (6, 2, 2, "= 4 does not divide the world size 6"),
        (4, 0, 1, "must be >= 1"),
    ],
)
def test_bad_sizes(world, tp, pp, message):
    with pytest.raises(TopologyError, match=message):
        Topology.from_world(world, tp=tp, pp=pp)


def test_bad_axis_value():
    with pytest.raises(TopologyError, match="parallel.pipeline_parallel must be a positive integer"):
        Topology(tp=1, pp=0, dp=1)
    with pytest.raises(TopologyError, match="outside a world of 4"):
        Topology(2, 1, 2).coord(4)


def _groups_worker(rank, world, tp, pp):
    topo = Topology.from_world(world, tp=tp, pp=pp)
    groups = ParallelGroups.build(topo)
    out = {"coord": tuple(groups.coord), "ranks": dict(groups.ranks)}
    # A collective over each group sums exactly the member ranks.
    for name in ("tensor", "pipeline", "data", "model_parallel", "embedding"):
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=getattr(groups, name))
        out[f"sum_{name}"] = x.item()
    out["first"], out["last"] = groups.is_first_stage, groups.is_last_stage
    out["tp_group_is_none"] = groups.tp_group is None
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_process_groups_four_ranks(tp, pp):
    results = run_distributed(_groups_worker, 4, args=(tp, pp))
    topo = Topology.from_world(4, tp=tp, pp=pp)
    for rank, res in enumerate(results):
        assert res["coord"] == tuple(topo.coord(rank))
        for name, groups in (
            ("tensor", topo.tensor_groups()),
            ("pipeline", topo.pipeline_groups()),
            ("data", topo.data_groups()),
            ("model_parallel", topo.model_parallel_groups()),
            ("embedding", topo.embedding_groups()),
        ):
            mine = next(g for g in groups if rank in g)
            assert res["ranks"][name] == mine
            assert res[f"sum_{name}"] == float(sum(mine))
        assert res["first"] == (topo.coord(rank).pipe == 0)
        assert res["last"] == (topo.coord(rank).pipe == pp - 1)
        assert res["tp_group_is_none"] == (tp == 1)


def test_build_refuses_wrong_world():
    with pytest.raises(RuntimeError, match="must be initialised"):
        ParallelGroups.build(Topology(1, 1, 1))
