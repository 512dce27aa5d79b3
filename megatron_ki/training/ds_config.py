"""The DeepSpeed JSON config, generated from the dataclass config (one source of truth).

A user JSON (``train.deepspeed_config``) may override any part of it; the batch sizes must still agree
with the framework's, since the data sampler is built from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_ki.config import Config, ConfigError, deep_merge
from megatron_ki.fileio import write_text_atomic


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` over ``world_size`` ranks (data parallel = world / (tp x pp))."""
    dp = world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    train = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // (train.micro_batch_size * dp),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.checkpoint.load_universal:
        if train.zero_stage == 0:
            # DeepSpeed restores universal checkpoints through the ZeRO optimizer only; at stage 0 it would
            # load nothing and say nothing.
            raise ConfigError(
                "checkpoint.load_universal",
                "needs train.zero_stage 1 or 2 (DeepSpeed loads them through ZeRO)",
            )
        ds["checkpoint"] = {"load_universal": True}
    if (cfg.ki.enabled or cfg.parallel.sequence_parallel) and cfg.parallel.pipeline_parallel > 1:
        # The KI activation changes shape when the teacher is released (dynamic shapes); DeepSpeed caches the
        # metadata of TP-partitioned pipeline activations once, so send them whole. With sequence parallelism
        # each TP rank's activation is its own chunk of the sequence, not a copy DeepSpeed may split and regather.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if train.zero_stage > 0:
        ds["zero_optimization"].update(
            {
                "contiguous_gradients": True,
                "overlap_comm": False,
                "reduce_scatter": True,
                "allgather_partitions": True,
            }
        )
        # The optimizer is the framework's GuardedAdamW (a torch.optim.AdamW subclass) on CPU/fp32, which
        # DeepSpeed's ZeRO wrapper refuses unless told; ZeRO only needs a torch optimizer's interface.
        ds["zero_allow_untested_optimizer"] = True
    if train.precision == "bf16":
        # Gradients are accumulated and reduced in fp32: bf16 sums over many micro-batches lose bits.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return _with_user_config(cfg, ds) if train.deepspeed_config else ds


def _with_user_config(cfg: Config, ds: dict[str, Any]) -> dict[str, Any]:
    """``ds`` with the user's ``train.deepspeed_config`` JSON merged over it, once it agrees with the framework."""
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise ConfigError("train.deepspeed_config", f"file not found: {path}")
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError("train.deepspeed_config", f"{path} is not valid JSON: {e}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in user and user[key] != ds[key]:
            raise ConfigError(
                "train.deepspeed_config",
                f"{path} sets {key}={user[key]} but the framework config gives {ds[key]}; "
                "set batch sizes with train.micro_batch_size / train.global_batch_size",
            )
    ds = deep_merge(ds, user)
    _check_user_overrides(cfg, ds, path)
    return ds


def _check_user_overrides(cfg: Config, ds: dict[str, Any], path: Path) -> None:
    """A user DeepSpeed JSON must not split what sequence parallelism already split: DeepSpeed's partitioning
    of pipeline activations and its activation-checkpoint partitioning assume every TP rank holds the same
    tensor, while each holds its own chunk of the sequence."""
    if not (cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel > 1):
        return
    pipe = ds.get("pipeline", {})
    for key, on in (
        (
            "pipeline.pipe_partitioned",
            pipe.get("pipe_partitioned", False) and cfg.parallel.pipeline_parallel > 1,
        ),
        (
            "pipeline.grad_partitioned",
            pipe.get("grad_partitioned", False) and cfg.parallel.pipeline_parallel > 1,
        ),
        (
            "activation_checkpointing.partition_activations",
            ds.get("activation_checkpointing", {}).get("partition_activations", False),
        ),
    ):
        if on:
            raise ConfigError(
                "train.deepspeed_config",
                f"{path} sets {key} true, which does not go with parallel.sequence_parallel (each tensor-parallel "
                "rank already holds only its chunk of the sequence); remove it",
            )


def write_deepspeed_config(ds: dict[str, Any], run_dir: str | Path) -> Path:
    """Write the config beside the run's logs (atomically) so a run can be audited and repeated."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "deepspeed_config.json"
    write_text_atomic(path, json.dumps(ds, indent=2, sort_keys=True))
    return path
