"""Resume ZeRO 1/2 optimizer state at another data-parallel size.

ZeRO flattens each parameter group, pads it to a multiple of ``2 x dp`` and keeps one equal slice per
data-parallel rank (fp32 master weights and the Adam moments); its checkpoints store each rank's slice, so
DeepSpeed refuses to load them at another dp size unless they were converted to its universal format first.
Here every rank reads the saved slices of its own model-parallel rank, removes their padding, and hands them
to the ZeRO optimizer's own elastic restore (the routine behind DeepSpeed's ``elastic_checkpoint``), which
re-pads and re-slices them for the new size. The checkpoints themselves stay in DeepSpeed's per-rank
("rigid") format, so a resume at the same size still reads one file per rank.

Cost: each rank reads all saved slices of its model-parallel rank once and DeepSpeed's restore merges them
into one copy (the optimizer state of its model shard, about 12 bytes per parameter, in host memory), as its
elastic checkpoints do on every load; the files are memory-mapped, so they are not held in memory as well.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from megatron_ki.checkpoint_format import CheckpointError, load_torch_file

logger = logging.getLogger("megatron_ki")

# The ZeRO 1/2 optimizer's restore routines this module relies on (private to DeepSpeed; checked at run time,
# tested with 0.19.8).
_RESTORE_METHODS = (
    "_load_global_state",
    "_restore_elastic_base_optimizer_state",
    "_restore_from_elastic_fp32_weights",
    "_link_all_hp_params",
)


def zero_shard_files(ckpt_dir: Path, mp_rank: int, dp: int) -> list[Path]:
    """The ZeRO optimizer files of model-parallel rank ``mp_rank`` saved by ``dp`` data-parallel ranks."""
    for prefix in ("", "bf16_"):
        files = [
            ckpt_dir / f"{prefix}zero_pp_rank_{r}_mp_rank_{mp_rank:02d}_optim_states.pt" for r in range(dp)
        ]
        if all(f.is_file() for f in files):
            return files
    raise CheckpointError(
        f"{ckpt_dir} lacks the ZeRO optimizer files of model-parallel rank {mp_rank} for its {dp} data-parallel "
        f"ranks (expected zero_pp_rank_0..{dp - 1}_mp_rank_{mp_rank:02d}_optim_states.pt)"
    )


def elastic_form(sd: dict[str, Any]) -> dict[str, Any]:
    """One rank's ZeRO state dict in the padding-free, per-group form of DeepSpeed's elastic checkpoints.

    A rigid state dict holds the torch optimizer's ``state_dict()`` over this rank's padded flat slice
    (one flat parameter per group); only the last rank's slice carries the group's padding (``group_paddings``).
    """
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, BASE_OPTIMIZER_STATE_STEP, GROUP_PADDINGS

    base = sd[BASE_OPTIMIZER_STATE]
    if isinstance(base, list):  # saved with zero_optimization.elastic_checkpoint: already this form
        return sd
    groups = []
    for i, group in enumerate(base["param_groups"]):
        (index,) = group["params"]
        pad = sd[GROUP_PADDINGS][i]
        state = base["state"].get(index, {})
        groups.append(
            {k: v[: v.numel() - pad] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}
        )
    return {
        **sd,
        BASE_OPTIMIZER_STATE: groups,
        BASE_OPTIMIZER_STATE_STEP: base["param_groups"][0].get("step"),
    }


def load_zero_state_at_other_dp(engine, ckpt_dir: Path, saved_dp: int) -> None:
    """Load the ZeRO optimizer state of ``ckpt_dir`` (saved by ``saved_dp`` data-parallel ranks) into
    ``engine``, whose module weights and LR schedule were already loaded. Collective-free; every rank calls it.
    """
    import deepspeed
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

    opt = engine.optimizer
    missing = [m for m in _RESTORE_METHODS if not hasattr(opt, m)]
    if missing or not hasattr(engine, "checkpoint_mp_rank"):
        raise CheckpointError(
            f"{ckpt_dir}: DeepSpeed {deepspeed.__version__}'s ZeRO optimizer ({type(opt).__name__}) lacks "
            f"{missing or ['engine.checkpoint_mp_rank']}, needed to re-partition the optimizer state saved at "
            f"data_parallel={saved_dp}: resume with {saved_dp} data-parallel ranks"
        )
    files = zero_shard_files(ckpt_dir, engine.checkpoint_mp_rank, saved_dp)
    # Memory-mapped: the files' pages are read while DeepSpeed merges them, not all held as well as the merge.
    rigid = [load_torch_file(f, mmap=True)[OPTIMIZER_STATE_DICT] for f in files]
    saved = [elastic_form(sd) for sd in rigid]
    opt._load_global_state(saved[0])  # loss scaler, clipping: the same on every rank
    opt._restore_elastic_base_optimizer_state(saved)
    opt._restore_from_elastic_fp32_weights(saved)
    for group, saved_state in zip(opt.optimizer.param_groups, saved[0][BASE_OPTIMIZER_STATE], strict=True):
        # Scalars (torch AdamW's per-parameter 'step') come back as 1-element fp32 vectors: restore them as saved.
        state = opt.optimizer.state[group["params"][0]]
        state.update({k: v.clone() for k, v in saved_state.items() if torch.is_tensor(v) and v.dim() == 0})
    base = rigid[0][BASE_OPTIMIZER_STATE]
    if isinstance(base, dict):
        # The elastic restore sets only 'step' on the param groups; take their hyperparameters (the LR of
        # the saved step above all) from the saved torch state dict, as a same-size resume does.
        for group, saved_group in zip(opt.optimizer.param_groups, base["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            if saved_group.get("step") is None:
                group.pop("step", None)
    opt._link_all_hp_params()
    logger.info(
        "re-partitioned the ZeRO optimizer state of %s from %d to %d data-parallel ranks",
        ckpt_dir,
        saved_dp,
        engine.dp_world_size,
    )
