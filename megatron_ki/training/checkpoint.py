"""Atomic DeepSpeed checkpoints with the framework's metadata and every rank's RNG state.

A save writes everything under ``<save>/<tag>.tmp`` (DeepSpeed's files, ``rng/rank{r}.pt`` per rank,
``meta.json``), waits for every rank, then rank 0 renames the folder to ``<tag>`` and only then rewrites
``latest``. A run killed in the middle (even ``kill -9``) leaves the previous tag published and loadable;
the ``.tmp`` leftovers are removed by the next save. The last ``keep_last`` tags are kept.
The KI teacher is never part of the engine's module, so it is never written here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ki.config import Config
from megatron_ki.convert.reshard import (
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    read_latest,
    read_meta,
    write_text_atomic,
)
from megatron_ki.parallel import ParallelGroups
from megatron_ki.training.zero_repartition import load_zero_state_at_other_dp

logger = logging.getLogger("megatron_ki")
TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state(tp_tracker=None) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if tp_tracker is not None:
        state["tp_tracker"] = tp_tracker.state_dict()
    return state


def set_rng_state(state: dict[str, Any], tp_tracker=None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if tp_tracker is not None and "tp_tracker" in state:
        tp_tracker.load_state_dict(state["tp_tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def published_tags(root: Path) -> list[str]:
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)) if root.is_dir() else []
    )


def save_checkpoint(
    engine,
    cfg: Config,
    groups: ParallelGroups,
    step: int,
    consumed_samples: int,
    extra_meta: dict[str, Any] | None = None,
    tp_tracker=None,
) -> Path:
    """Save the engine and the framework's state for ``step``; collective over all ranks."""
    root = Path(cfg.checkpoint.save)  # type: ignore[arg-type]
    tag = tag_for(step)
    tmp_tag = f"{tag}.tmp"
    if groups.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # an earlier save that did not finish
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    rng_dir = root / tmp_tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(tp_tracker), rng_dir / f"rank{groups.rank:05d}.pt")
    if os.environ.get("MEGATRON_KI_KILL_IN_SAVE") == str(step):
        # Test hook (tests/test_training.py): die like `kill -9` with this tag's files written but unpublished.
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if groups.rank == 0:
        topo = groups.topology
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "consumed_samples": consumed_samples,
            "layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "zero_stage": cfg.train.zero_stage},
            "weights_only": False,
            "config": cfg.to_dict(),
            "tokenizer": {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model},
            **(extra_meta or {}),
        }
        write_text_atomic(root / tmp_tag / META_FILE, json.dumps(meta, indent=2))
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        (root / tmp_tag).rename(final)
        write_text_atomic(root / LATEST_FILE, tag)
        for old in published_tags(root)[: -cfg.checkpoint.keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
        logger.info("saved checkpoint %s (step %d, %d samples)", final, step, consumed_samples)
    _barrier()
    return root / tag


def load_checkpoint(engine, cfg: Config, groups: ParallelGroups, tp_tracker=None) -> dict[str, Any] | None:
    """Resume from ``checkpoint.load``'s latest tag: engine (model, optimizer, LR schedule) and RNG states.

    Returns the metadata (``step``, ``consumed_samples``), or None when the directory holds no checkpoint yet.
    A different data-parallel size is accepted (ZeRO 1/2 optimizer state is re-partitioned, see
    ``zero_repartition``); a different tp/pp is refused (use tools/convert_checkpoint.py).
    """
    root = Path(cfg.checkpoint.load)  # type: ignore[arg-type]
    if read_latest(root) is None:
        if root.is_dir() and any(root.iterdir()):
            logger.warning("%s has no '%s' file: starting from scratch", root, LATEST_FILE)
        return None
    tag, meta = read_meta(root)
    layout, topo = meta["layout"], groups.topology
    if (layout["tp"], layout["pp"]) != (topo.tp, topo.pp):
        raise CheckpointError(
            f"{root / tag} was saved with tensor_parallel={layout['tp']}, pipeline_parallel={layout['pp']} but this "
            f"run uses {topo.tp}, {topo.pp}: reshard it first with tools/convert_checkpoint.py --target-tp/--target-pp"
        )
    weights_only = meta.get("weights_only", False)
    saved_zero = layout.get("zero_stage", 0)
    if not weights_only and (saved_zero > 0) != (cfg.train.zero_stage > 0):
        # ZeRO (1 and 2 share one format) and plain DeepSpeed store the optimizer state differently.
        raise CheckpointError(
            f"{root / tag} was saved with ZeRO stage {saved_zero} but this run has train.zero_stage "
            f"{cfg.train.zero_stage}: resume with train.zero_stage {'1 or 2' if saved_zero else 0}, or convert "
            "it to a weights-only checkpoint with tools/convert_checkpoint.py (the optimizer state restarts)"
        )
    repartition = not weights_only and saved_zero > 0 and layout["dp"] != topo.dp
    load_path, _ = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_module_only=weights_only,
        # DeepSpeed refuses ZeRO state saved at another dp size; it is re-partitioned below instead.
        load_optimizer_states=not weights_only and not repartition,
        load_lr_scheduler_states=not weights_only,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    if repartition:
        load_zero_state_at_other_dp(engine, root / tag, layout["dp"])
    rng_file = root / tag / "rng" / f"rank{groups.rank:05d}.pt"
    if layout["dp"] == topo.dp and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False), tp_tracker)
    elif not weights_only:
        logger.warning("RNG states not restored (data-parallel size %d -> %d)", layout["dp"], topo.dp)
    logger.info("resumed from %s at step %d", root / tag, meta["step"])
    return meta
