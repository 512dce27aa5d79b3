"""DeepSpeed engine construction: the framework's groups handed to DeepSpeed, AdamW, the LR schedule.

pp = 1 uses ``deepspeed.initialize`` with ZeRO 0-2 over the data-parallel group; tensor parallelism
comes from the framework's layers, and DeepSpeed learns the groups from :class:`DeepSpeedMPU`.
pp > 1 passes a ``PipelineModule`` (see ``megatron_ki.models.pipe``), whose grid DeepSpeed builds from
the same topology.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_ki.config import Config
from megatron_ki.parallel import ParallelGroups
from megatron_ki.training.deepspeed_compat import (
    check_deepspeed_version,
    install_gradient_clipping,
    release_deepspeed_shm,
)
from megatron_ki.training.lr import lr_schedule

logger = logging.getLogger("megatron_ki")


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed queries for groups (Megatron's interface), backed by ParallelGroups.

    "Model parallel" means tensor parallel here, as in Megatron-DeepSpeed: DeepSpeed uses it to avoid
    counting replicated parameters twice in the gradient norm and to name checkpoint shards.
    """

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def _rank(self, name: str) -> int:
        return self.groups.ranks[name].index(self.groups.rank)

    def get_model_parallel_group(self):
        return self.groups.tensor

    def get_model_parallel_rank(self) -> int:
        return self._rank("tensor")

    def get_model_parallel_world_size(self) -> int:
        return self.groups.topology.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.ranks["tensor"][0]

    def get_data_parallel_group(self):
        return self.groups.data

    def get_data_parallel_rank(self) -> int:
        return self._rank("data")

    def get_data_parallel_world_size(self) -> int:
        return self.groups.topology.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.groups.ranks["data"])

    def get_pipeline_model_parallel_group(self):
        return self.groups.pipeline

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._rank("pipeline")

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.topology.pp


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and 1-D parameters are not decayed (Megatron, HF)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the update (and counts it) when any rank holds a non-finite gradient.

    DeepSpeed skips overflowing steps itself for fp16 (and bf16 with ZeRO); this covers fp32 and the other
    paths, so a NaN batch never poisons the weights. Every rank calls ``step`` together, so the one
    all-reduce of a flag is safe.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.nonfinite_skips = 0

    @torch.no_grad()
    def step(self, closure=None):
        finite = torch.ones((), dtype=torch.float32)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    finite.zero_()
                    break
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            self.nonfinite_skips += 1
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's fused (GPU) Adam when it builds, else torch's guarded AdamW (fused on CUDA)."""
    groups = param_groups(model, cfg.optim.weight_decay)
    kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if on_cuda and cfg.train.precision != "fp32":
        try:
            from deepspeed.ops.adam import FusedAdam

            opt = FusedAdam(groups, adam_w_mode=True, **kwargs)
            logger.info("optimizer: DeepSpeed FusedAdam (AdamW mode)")
            return opt
        except Exception as e:  # the op may fail to build on this machine
            logger.info("optimizer: DeepSpeed FusedAdam unavailable (%s); using torch AdamW", e)
    logger.info("optimizer: torch AdamW with non-finite step guard (%s)", "fused" if on_cuda else "foreach")
    return GuardedAdamW(groups, fused=on_cuda or None, foreach=None if on_cuda else True, **kwargs)


def clip_grad_norm(parameters, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """Clip gradients by their global 2-norm, counting each parameter once over tensor x pipeline ranks.

    TP-sharded parameters count on every TP rank, replicated ones on TP rank 0 only, and a pipeline
    replica of a tied weight (``ds_pipe_replicated``) not at all. Used for fp32 without ZeRO, where
    DeepSpeed's own clipping miscounts under pipeline parallelism.
    """
    params = [p for p in parameters if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:
        if getattr(p, "ds_pipe_replicated", False):
            continue
        if groups.tp_rank == 0 or getattr(p, "tensor_model_parallel", False):
            total += p.grad.detach().float().pow(2).sum()
    if groups.model_parallel is not None:
        dist.all_reduce(total, group=groups.model_parallel)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return norm


def initialize_engine(
    cfg: Config, model: nn.Module, groups: ParallelGroups, ds_config: dict[str, Any] | None = None
):
    """``deepspeed.initialize`` with the framework's optimizer, LR schedule and groups; returns the engine.
    ``ds_config`` defaults to :func:`~megatron_ki.training.ds_config.deepspeed_config` of ``cfg``."""
    import deepspeed

    from megatron_ki.training.ds_config import deepspeed_config

    if ds_config is None:
        ds_config = deepspeed_config(cfg, groups.topology.world_size)

    check_deepspeed_version()
    optimizer = build_optimizer(model, cfg)
    schedule = lr_schedule(cfg.optim, cfg.train.train_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / cfg.optim.lr)
    pipeline = cfg.parallel.pipeline_parallel > 1
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=None if pipeline else DeepSpeedMPU(groups),
        dist_init_required=not dist.is_initialized(),
    )
    release_deepspeed_shm()
    fp32_plain = cfg.train.precision == "fp32" and cfg.train.zero_stage == 0
    if fp32_plain and cfg.optim.clip_grad > 0:
        install_gradient_clipping(
            engine, lambda: clip_grad_norm(engine.module.parameters(), cfg.optim.clip_grad, groups)
        )
    engine.guarded_optimizer = optimizer if isinstance(optimizer, GuardedAdamW) else None
    return engine
