"""Every use of DeepSpeed internals, in one place, each with the DeepSpeed behaviour it works around.

Tested with DeepSpeed 0.19 (CPU/gloo here, the same code paths on NCCL); :func:`check_deepspeed_version`
refuses another major version with a clear message and logs a warning for another minor one. What is used:

- ``KIPipelineModule`` (a ``PipelineModule`` subclass):
  ``forward_funcs`` (find the tied embedding's copies), ``_partition_layers``/``_set_bounds``/``parts``/``_topo``
  (DeepSpeed balances parameter or layer counts only; "compute" balances measured per-layer costs, with
  DeepSpeed's own ``partition_balanced``), ``get_tied_weights_and_groups``/``allreduce_tied_weight_gradients``
  (DeepSpeed ties weights within its pipe groups only; the student's input and output embedding are tied over
  the framework's embedding group, Megatron's scheme), and the parameter flags ``ds_pipe_replicated`` and
  ``model_parallel`` that DeepSpeed's gradient-norm code reads (so a tied copy and a TP-replicated parameter
  count once).
- ``engine.clip_fp32_gradients`` / ``engine._global_grad_norm``: DeepSpeed's fp32 (no ZeRO) clipping counts
  replicated parameters on every pipeline stage; :func:`install_gradient_clipping` replaces it.
- ``engine.skipped_steps`` and the optimizer's ``cur_scale``/``loss_scale``: read for the step metrics.
- The ZeRO 1/2 optimizer's private restore routines (``zero_restore_methods``), used by
  ``training/zero_repartition.py`` to resume ZeRO state at another data-parallel size.
- The name of DeepSpeed's CPU all-reduce workspace in ``/dev/shm`` (:func:`release_deepspeed_shm`): DeepSpeed
  creates one per rank and never removes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_ki.errors import MegatronKIError

logger = logging.getLogger("megatron_ki")

TESTED_VERSION = (0, 19)


class DeepSpeedVersionError(MegatronKIError):
    """The installed DeepSpeed is a major version this module was not written against."""


def check_deepspeed_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of DeepSpeed; another major than the tested one is an error, another minor a warning."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    try:
        major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError as e:
        raise DeepSpeedVersionError(f"cannot read the DeepSpeed version {version!r}") from e
    tested = ".".join(map(str, TESTED_VERSION))
    if major != TESTED_VERSION[0]:
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is installed, but megatron_ki relies on DeepSpeed internals tested with "
            f"{tested}.x (see megatron_ki/training/deepspeed_compat.py): install deepspeed>=0.14,<1"
        )
    if (major, minor) != TESTED_VERSION and not getattr(check_deepspeed_version, "_warned", False):
        check_deepspeed_version._warned = True  # type: ignore[attr-defined]
        logger.warning(
            "DeepSpeed %s: megatron_ki's use of its internals is tested with %s.x", version, tested
        )
    return major, minor


# ------------------------------------------------------------------------------------------------ comm
_shm_released: set[tuple[str, str, int]] = set()


def release_deepspeed_shm() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce workspace from ``/dev/shm`` once every rank has mapped it.

    DeepSpeed's CPU communication op (``ShareMemCommBuilder``) creates ``deepspeed_allreduce_buffer_*`` per
    rank and never unlinks it, so every CPU run would leave its workspaces in ``/dev/shm`` (RAM) until reboot.
    A mapped segment stays valid after its name is removed. Collective over all ranks: call it on every rank
    right after DeepSpeed's comm layer is initialised; later calls for the same rendezvous do nothing.
    """
    if not dist.is_initialized():
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    key = (addr, port, dist.get_rank())
    if key in _shm_released:
        return
    _shm_released.add(key)
    dist.barrier()  # every rank has returned from DeepSpeed's shm set-up, which maps all peers' workspaces
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), addr, port, str(dist.get_rank())])
    Path("/dev/shm", name).unlink(missing_ok=True)


def ensure_deepspeed_comm() -> None:
    """DeepSpeed's comm layer over an already initialised torch process group (tests, pipeline builds)."""
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    release_deepspeed_shm()


# ---------------------------------------------------------------------------------------------- engine
def install_gradient_clipping(engine, clip: Callable[[], torch.Tensor]) -> None:
    """Replace DeepSpeed's fp32 (no ZeRO) gradient clipping by ``clip() -> global norm``; the norm is stored
    where ``engine.get_global_grad_norm()`` reads it."""

    def clip_and_record() -> None:
        engine._global_grad_norm = clip()

    engine.clip_fp32_gradients = clip_and_record


def skipped_steps(engine) -> int:
    """Steps DeepSpeed skipped (fp16/bf16 overflow) plus those the framework's guarded optimizer skipped."""
    guarded = getattr(engine, "guarded_optimizer", None)
    return int(getattr(engine, "skipped_steps", 0) or 0) + (
        guarded.nonfinite_skips if guarded is not None else 0
    )


def global_grad_norm(engine) -> float | None:
    try:
        norm = engine.get_global_grad_norm()
    except Exception:  # DeepSpeed raises or returns None before the first step on some paths
        return None
    return None if norm is None else float(norm)


def loss_scale(engine) -> float | None:
    """The fp16 loss scale (``cur_scale`` of DeepSpeed's fp16 optimizers, ``loss_scale`` of others)."""
    opt = getattr(engine, "optimizer", None)
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    try:
        return float(scale) if scale is not None else None
    except (TypeError, ValueError):
        return None


# -------------------------------------------------------------------------------------------- pipeline
def ki_pipeline_module(
    layers: list,
    topology,
    groups,
    loss_fn,
    partition_method: str,
    layer_costs: list[float] | None,
    tied_types: tuple[type, ...],
    head_type: type,
    tie_word_embeddings: bool,
    dynamic_shape: bool,
) -> nn.Module:
    """A ``PipelineModule`` over ``topology`` (``megatron_ki.parallel.Topology``): ``layers`` split into stages
    (``partition_method`` "compute": by ``layer_costs``), the tied embedding's copies (layers of ``tied_types``
    exposing ``word_embeddings_weight``) all-reduced over ``groups.embedding``."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime import utils as ds_utils

    ensure_deepspeed_comm()

    class KIPipelineModule(PipelineModule):
        def __init__(self):
            super().__init__(
                layers=layers,
                topology=topology.to_deepspeed(),
                loss_fn=loss_fn,
                partition_method=partition_method,
                dynamic_shape=dynamic_shape,
            )
            self.tied_embedding = []  # a plain list: a Parameter attribute would be registered a second time
            if tie_word_embeddings and topology.pp > 1:
                self.tied_embedding = _tied_embedding_copies(self.forward_funcs, tied_types, head_type)
            if groups.tp_rank == 0:
                # DeepSpeed's ZeRO / fp32 norms count TP-replicated parameters only where its "model parallel
                # rank" (over pipe x tensor) is 0, i.e. on the first stage alone; mark this stage's as owned.
                for p in self.parameters():
                    p.model_parallel = True

        def _partition_layers(self, method="uniform"):
            if method != "compute":
                return super()._partition_layers(method)
            self.parts = ds_utils.partition_balanced(weights=layer_costs, num_parts=self.num_stages)
            stage = self._topo.get_coord(self.global_rank).pipe
            if self.global_rank == 0:
                spans = [f"{self.parts[i]}-{self.parts[i + 1] - 1}" for i in range(self.num_stages)]
                logger.info("pipeline stages by compute: layers %s of %d", ", ".join(spans), len(layer_costs))
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def get_tied_weights_and_groups(self):
            return super().get_tied_weights_and_groups() + [
                (w, groups.embedding) for w in self.tied_embedding
            ]

        def allreduce_tied_weight_gradients(self):
            super().allreduce_tied_weight_gradients()
            for weight in self.tied_embedding:
                if weight.grad is not None:
                    dist.all_reduce(weight.grad, group=groups.embedding)

    return KIPipelineModule()


def _tied_embedding_copies(layers, tied_types: tuple[type, ...], head_type: type) -> list[torch.Tensor]:
    """This stage's copies of the tied input/output embedding; the head's copy is flagged
    ``ds_pipe_replicated`` so DeepSpeed's gradient norm counts the weight once."""
    tied = []
    for layer in layers:
        weight = getattr(layer, "word_embeddings_weight", None)
        if isinstance(layer, tied_types) and weight is not None:
            tied.append(weight)
            if isinstance(layer, head_type):
                weight.ds_pipe_replicated = True
    return tied


# ------------------------------------------------------------------------------------------------ ZeRO
ZERO_RESTORE_METHODS = (
    "_load_global_state",
    "_restore_elastic_base_optimizer_state",
    "_restore_from_elastic_fp32_weights",
    "_link_all_hp_params",
)
"""The ZeRO 1/2 optimizer's private restore routines behind DeepSpeed's ``elastic_checkpoint``."""


def zero_restore_methods(optimizer: Any) -> dict[str, Callable]:
    """The private ZeRO restore routines of ``optimizer``, or an error naming the missing ones."""
    missing = [m for m in ZERO_RESTORE_METHODS if not hasattr(optimizer, m)]
    if missing:
        raise DeepSpeedVersionError(
            f"this DeepSpeed's ZeRO optimizer lacks {', '.join(missing)}: resuming ZeRO state at another "
            f"data-parallel size needs DeepSpeed {'.'.join(map(str, TESTED_VERSION))}.x"
        )
    return {m: getattr(optimizer, m) for m in ZERO_RESTORE_METHODS}
