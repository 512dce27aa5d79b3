"""The parallel topology: tensor x pipeline x data over the world, and its process groups.

Rank layout is DeepSpeed's ``PipeModelDataParallelTopology`` (axes ``pipe``, ``data``, ``model``, the last
varying fastest), so DeepSpeed's pipeline engine and the framework's layers see the same groups:

    rank = pipe * (dp * tp) + data * tp + tensor

:class:`Topology` is pure arithmetic (no process groups; usable before ``init_process_group``).
:class:`ParallelGroups` creates every group once, in the same order on every rank, and is passed
explicitly to the code that needs it; nothing here is a module-level mutable global.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_ki.errors import MegatronKIError


class TopologyError(MegatronKIError, ValueError):
    """The requested sizes do not fit the world; the message names the option."""


class Coord(NamedTuple):
    """A rank's position on each axis."""

    pipe: int
    data: int
    tensor: int


@dataclass(frozen=True)
class Topology:
    """Sizes of the three axes; ``tp * pp * dp`` equals the world size."""

    tp: int
    pp: int
    dp: int

    def __post_init__(self) -> None:
        for name, value in (
            ("tensor_parallel", self.tp),
            ("pipeline_parallel", self.pp),
            ("data_parallel", self.dp),
        ):
            if not isinstance(value, int) or value < 1:
                raise TopologyError(f"parallel.{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> Topology:
        """Derive the data-parallel size; refuse sizes that do not divide the world."""
        if tp < 1 or pp < 1:
            raise TopologyError(
                f"parallel.tensor_parallel ({tp}) and parallel.pipeline_parallel ({pp}) must be >= 1"
            )
        if world_size % (tp * pp) != 0:
            raise TopologyError(
                f"parallel.tensor_parallel x parallel.pipeline_parallel = {tp} x {pp} = {tp * pp} "
                f"does not divide the world size {world_size}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside a world of {self.world_size}")
        pipe, rest = divmod(rank, self.dp * self.tp)
        data, tensor = divmod(rest, self.tp)
        return Coord(pipe, data, tensor)

    def rank(self, pipe: int, data: int, tensor: int) -> int:
        return pipe * self.dp * self.tp + data * self.tp + tensor

    def tensor_groups(self) -> list[list[int]]:
        """Ranks that split one layer's weights: same pipe stage and data replica."""
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def pipeline_groups(self) -> list[list[int]]:
        """Ranks that hold the successive stages of one model replica shard."""
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def data_groups(self) -> list[list[int]]:
        """Ranks that hold the same parameters and average their gradients."""
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks that together hold one full model replica (tensor x pipeline), e.g. for the gradient norm."""
        return [
            [self.rank(p, d, t) for p, t in itertools.product(range(self.pp), range(self.tp))]
            for d in range(self.dp)
        ]

    def embedding_groups(self) -> list[list[int]]:
        """First and last pipeline stage of each pipeline: they all-reduce the tied embedding's gradient."""
        groups = []
        for ranks in self.pipeline_groups():
            groups.append([ranks[0], ranks[-1]] if len(ranks) > 1 else [ranks[0]])
        return groups

    def to_deepspeed(self):
        """The equivalent ``PipeModelDataParallelTopology`` for DeepSpeed's PipelineModule."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


def _group_of(rank: int, groups: list[list[int]]) -> list[int]:
    for ranks in groups:
        if rank in ranks:
            return ranks
    raise TopologyError(f"rank {rank} is in none of the groups {groups}")


@dataclass
class ParallelGroups:
    """This rank's coordinates and process groups. ``None`` groups mean a single process (no collectives)."""

    topology: Topology
    rank: int
    tensor: ProcessGroup | None = None
    pipeline: ProcessGroup | None = None
    data: ProcessGroup | None = None
    model_parallel: ProcessGroup | None = None
    embedding: ProcessGroup | None = None
    ranks: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def single(cls) -> ParallelGroups:
        """One process, no process group needed."""
        topo = Topology(1, 1, 1)
        return cls(
            topo, 0, ranks={k: [0] for k in ("tensor", "pipeline", "data", "model_parallel", "embedding")}
        )

    @classmethod
    def build(
        cls, topology: Topology, backend: str | None = None, timeout: timedelta | None = None
    ) -> ParallelGroups:
        """Create every group of ``topology``; collective: all ranks must call it in the same order.

        ``timeout`` bounds each collective of the groups (torch gives new groups 30 minutes, not the world's).
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before ParallelGroups.build")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != topology.world_size:
            raise TopologyError(
                f"topology tp={topology.tp} x pp={topology.pp} x dp={topology.dp} = {topology.world_size} ranks, "
                f"but the world has {world}"
            )
        out = cls(topology, rank)
        for name, groups in (
            ("tensor", topology.tensor_groups()),
            ("pipeline", topology.pipeline_groups()),
            ("data", topology.data_groups()),
            ("model_parallel", topology.model_parallel_groups()),
            ("embedding", topology.embedding_groups()),
        ):
            mine = None
            for ranks in groups:
                group = dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
                if rank in ranks:
                    mine = group
            setattr(out, name, mine)
            out.ranks[name] = _group_of(rank, groups)
        return out

    @property
    def coord(self) -> Coord:
        return self.topology.coord(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coord.tensor

    @property
    def pp_rank(self) -> int:
        return self.coord.pipe

    @property
    def dp_rank(self) -> int:
        return self.coord.data

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.topology.pp - 1

    @property
    def tp_group(self) -> ProcessGroup | None:
        """The tensor-parallel group to hand to layers (None when tp == 1, so layers skip collectives)."""
        return self.tensor if self.topology.tp > 1 else None
