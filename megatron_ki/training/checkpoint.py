"""Atomic DeepSpeed checkpoints with the framework's metadata and every rank's RNG state.

A save writes everything under ``<save>/<tag>.tmp`` (DeepSpeed's files, ``rng/rank{r}.pt`` per rank,
``meta.json``), waits for every rank, then rank 0 renames the folder to ``<tag>`` and only then rewrites
``latest``. A run killed in the middle (even ``kill -9``) leaves the previous tag published and loadable;
the ``.tmp`` leftovers are removed by the next save. A save that fails (a full disk) removes its ``.tmp``
folder and raises a :class:`CheckpointError` naming ``checkpoint.save``. The last ``keep_last`` tags are kept.

A resume loads the newest *complete* tag: every rank checks its share of the tag's files cheaply (``meta.json``
parses, every expected DeepSpeed and RNG file exists, every ``.pt`` file is a readable zip archive), the ranks
combine their verdicts, and a tag that fails is skipped for the next older one, with a log line naming the file.
The KI teacher is never part of the engine's module, so it is never written here.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ki.checkpoint_format import (
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    bytes_written,
    first_line,
    is_serialization_error,
    load_torch_file,
    meta_config,
    read_latest,
    read_meta_file,
    torch_file_problem,
    write_failure,
    write_latest,
    write_meta,
)
from megatron_ki.config import Config
from megatron_ki.errors import MegatronKIError, describe_os_error
from megatron_ki.folder_lock import LOCK_NAME
from megatron_ki.parallel import ParallelGroups
from megatron_ki.training.deepspeed_compat import (
    load_zero_state_at_other_dp,
    mark_bf16_zero_stage,
    replace_recovery_scripts,
    universal_checkpoint_info,
    universal_param_kinds,
)

logger = logging.getLogger("megatron_ki")
UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.constants' name
LATEST_UNIVERSAL_FILE = "latest_universal"  # written by DeepSpeed's ds_to_universal beside its output folder
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
    on_written: Callable[[Path], None] | None = None,
) -> Path:
    """Save the engine and the framework's state for ``step``; collective over all ranks. ``on_written(tmp_dir)``
    runs on each rank once its files are written under ``tmp_dir``, before the tag is published.

    A write that fails (OSError, or torch's serialization error of a full disk) raises a CheckpointError
    naming ``checkpoint.save`` and the directory; rank 0 removes the half-written ``<tag>.tmp`` folder, and the
    previous published tag and ``latest`` are left as they were."""
    root = Path(cfg.checkpoint.save)  # type: ignore[arg-type]
    tag = tag_for(step)
    tmp_tag = f"{tag}.tmp"
    try:
        _save(engine, cfg, groups, root, step, consumed_samples, extra_meta, tp_tracker, on_written)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_serialization_error(e):
            raise
        reason = write_failure(e, root, bytes_written(root / tmp_tag))
        if groups.rank == 0:  # best effort: another rank may still be writing, the next save retries
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        kept = None
        with contextlib.suppress(OSError):
            kept = read_latest(root)
        after = f"; the published {kept} is kept" if kept else ""
        raise CheckpointError(f"checkpoint.save {root}: could not write {tag}: {reason}{after}") from e
    return root / tag


def _save(engine, cfg, groups, root, step, consumed_samples, extra_meta, tp_tracker, on_written) -> None:
    tag = tag_for(step)
    tmp_tag = f"{tag}.tmp"
    if groups.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # an earlier save that did not finish
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    client_state = _client_state(engine, cfg, groups, step, consumed_samples)
    mark_bf16_zero_stage(engine)  # so that DeepSpeed's zero_to_fp32.py reads a bf16 checkpoint (tp = pp = 1)
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    rng_dir = root / tmp_tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(tp_tracker), rng_dir / f"rank{groups.rank:05d}.pt")
    if on_written is not None:
        on_written(root / tmp_tag)
    _barrier()
    if groups.rank == 0:
        topo = groups.topology
        meta = {
            "step": step,
            "consumed_samples": consumed_samples,
            "layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "zero_stage": cfg.train.zero_stage},
            "weights_only": False,
            "config": cfg.to_dict(),
            "tokenizer": {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model},
            **(extra_meta or {}),
        }
        write_meta(root / tmp_tag, meta)
        replace_recovery_scripts(root, topo.tp, topo.pp)
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        (root / tmp_tag).rename(final)
        write_latest(root, tag)
        for old in published_tags(root)[: -cfg.checkpoint.keep_last]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
        logger.info("saved checkpoint %s (step %d, %d samples)", final, step, consumed_samples)
    _barrier()


def _client_state(
    engine, cfg: Config, groups: ParallelGroups, step: int, consumed_samples: int
) -> dict[str, Any]:
    """What DeepSpeed stores beside its own state in every model-states file: the step (``iteration`` is the
    name DeepSpeed's converters read), the samples consumed (a resume from a universal checkpoint, which has no
    ``meta.json``, reads them here) and ``universal_checkpoint_info``, without which DeepSpeed's
    ``ds_to_universal`` refuses the checkpoint. Collective: the info covers every pipeline stage's parameters."""
    module = getattr(engine, "module", None)  # None: an engine stand-in without a model (tests)
    own = universal_param_kinds(module, groups.topology.tp) if module is not None else {}
    kinds: dict[str, tuple] = {}
    for share in _gather(own):
        kinds.update(share)
    topo = groups.topology
    info = universal_checkpoint_info(kinds, cfg.model.vocab_size, cfg.model.padded_vocab_size(topo.tp))
    layout = {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "zero_stage": cfg.train.zero_stage}
    return {
        "step": step,
        "iteration": step,
        "consumed_samples": consumed_samples,
        "layout": layout,
        UNIVERSAL_CHECKPOINT_INFO: info,
    }


# ------------------------------------------------------------------------------------------- resume
def expected_files(meta: dict[str, Any]) -> list[str]:
    """The files (relative to the tag; ``*`` a DeepSpeed prefix) a tag with this metadata must hold: DeepSpeed's
    model states (per model-parallel rank, and per pipeline layer when pp > 1), ZeRO's optimizer states (per
    data- and model-parallel rank), and one RNG file per rank. Weights-only tags (tools/convert_checkpoint.py)
    hold only the model states."""
    layout = meta["layout"]
    tp, pp, dp = int(layout["tp"]), int(layout["pp"]), int(layout.get("dp", 1))
    names: list[str] = []
    if pp > 1:
        num_layers = meta_config(meta).model.num_layers
        names += [
            f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(num_layers + 2) for t in range(tp)
        ]
    if pp == 1 or not meta.get("weights_only", False):
        names += [f"mp_rank_{m:02d}_model_states.pt" for m in range(tp * pp)]
    if not meta.get("weights_only", False):
        if int(layout.get("zero_stage", 0)) > 0:
            names += [
                f"*zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
                for d in range(dp)
                for m in range(tp * pp)
            ]
        names += [f"rng/rank{r:05d}.pt" for r in range(tp * pp * dp)]
    return names


def tag_problems(root: Path, tag: str, rank: int = 0, world: int = 1) -> list[str]:
    """What keeps ``tag`` from loading, as far as this rank's share (every ``world``-th file) shows; [] if
    nothing. Cheap: ``meta.json`` is parsed, files are looked up, ``.pt`` files have their zip directory read."""
    folder = root / tag
    if not folder.is_dir():
        named = f" (named by '{LATEST_FILE}')" if read_latest(root) == tag else ""
        return [f"{folder}{named} does not exist"]
    try:  # every rank must reach the collective that follows: no exception leaves here
        meta = read_meta_file(folder / META_FILE)
        expected = expected_files(meta)
        present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.pt"))
    except OSError as e:
        return [describe_os_error(e)]
    except (MegatronKIError, KeyError, TypeError, ValueError) as e:
        return [str(e) if isinstance(e, CheckpointError) else f"{folder / META_FILE}: {first_line(e)}"]
    problems = []
    for i, name in enumerate(dict.fromkeys([*expected, *present])):
        if i % world != rank:
            continue
        if name.startswith("*"):  # a ZeRO file, whose prefix depends on the precision
            if not any(folder.glob(name)):
                problems.append(f"{folder / name[1:]} is missing")
            continue
        problem = torch_file_problem(folder / name)
        if problem is not None:
            problems.append(f"{folder / name} {problem}")
    return problems


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def resume_candidates(root: Path) -> list[str]:
    """Tags to try, newest first: a non-step tag named by ``latest`` (a converted checkpoint), then every
    ``stepNNNNNNNN`` tag and the one ``latest`` names, by step. A tag newer than ``latest`` is one whose save
    was published but died before rewriting ``latest``."""
    latest = read_latest(root)
    steps = set(published_tags(root))
    if latest and TAG_RE.match(latest):
        steps.add(latest)
    ordered = sorted(steps, reverse=True)
    return [latest, *ordered] if latest and not TAG_RE.match(latest) else ordered


def find_resume_tag(root: Path) -> tuple[str, dict[str, Any], list[tuple[str, list[str]]]] | None:
    """``(tag, meta, skipped)``: the newest tag under ``root`` that every rank found complete, and the newer
    tags skipped with their problems; None if ``root`` holds no checkpoint. Collective when a process group
    exists (every rank checks a share of the files and all agree on the tag)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    candidates = resume_candidates(root)
    if not candidates:
        return None
    skipped: list[tuple[str, list[str]]] = []
    for tag in candidates:
        problems = list(
            dict.fromkeys(p for share in _gather(tag_problems(root, tag, rank, world)) for p in share)
        )
        if not problems:
            return tag, read_meta_file(root / tag / META_FILE), skipped
        skipped.append((tag, problems))
    problems = skipped[0][1]
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    older = f"; {len(skipped) - 1} older tag(s) are incomplete too" if len(skipped) > 1 else ""
    error = CheckpointError(
        f"checkpoint.load {root}: no complete checkpoint to resume from: {problems[0]}{more}{older}"
    )
    error.all_ranks = True  # every rank saw the same gathered problems
    raise error


def _problems_text(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def load_checkpoint(engine, cfg: Config, groups: ParallelGroups, tp_tracker=None) -> dict[str, Any] | None:
    """Resume from ``checkpoint.load``'s newest complete tag: engine (model, optimizer, LR schedule) and RNG
    states. A newer tag that is incomplete (a truncated or missing file) is skipped for the next older one.

    Returns the metadata (``step``, ``consumed_samples``), or None when the directory is missing or holds no
    checkpoint and ``checkpoint.load_if_exists`` is set (without it, that is an error). A different
    data-parallel size is accepted (ZeRO 1/2 optimizer state is re-partitioned, see ``deepspeed_compat.load_zero_state_at_other_dp``); a
    different tp/pp is refused (use tools/convert_checkpoint.py, or DeepSpeed's universal checkpoints:
    ``checkpoint.load_universal``, see :func:`load_universal_checkpoint`).
    """
    if cfg.checkpoint.load_universal:
        return load_universal_checkpoint(engine, cfg, groups)
    root = Path(cfg.checkpoint.load)  # type: ignore[arg-type]
    found = _resume_tag(root, cfg, groups.rank)
    if found is None:
        return None
    tag, meta = found
    layout, topo = meta["layout"], groups.topology
    weights_only = meta.get("weights_only", False)
    saved_zero = layout.get("zero_stage", 0)
    _check_layout(root / tag, layout, topo, weights_only, cfg.train.zero_stage)
    repartition = not weights_only and saved_zero > 0 and layout["dp"] != topo.dp
    _load_engine(engine, root, tag, weights_only, repartition)
    if repartition:
        load_zero_state_at_other_dp(engine, root / tag, layout["dp"])
    rng_file = root / tag / "rng" / f"rank{groups.rank:05d}.pt"
    if layout["dp"] == topo.dp and rng_file.is_file():
        set_rng_state(load_torch_file(rng_file), tp_tracker)
    elif not weights_only:
        logger.warning("RNG states not restored (data-parallel size %d -> %d)", layout["dp"], topo.dp)
    logger.info("resumed from %s at step %d", root / tag, meta["step"])
    return meta


def _resume_tag(root: Path, cfg: Config, rank: int) -> tuple[str, dict[str, Any]] | None:
    """The tag to resume from and its metadata (rank 0 says which newer tags it skipped and why); None when
    there is nothing to resume and ``checkpoint.load_if_exists`` allows that."""
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint.load {root}: is a file, expected a checkpoint directory")
    found = find_resume_tag(root) if root.is_dir() else None
    if found is None:
        # a folder holding only the job's lock (folder_lock.py creates save/ to lock it) was not there before
        fresh = not root.exists() or {p.name for p in root.iterdir()} <= {LOCK_NAME}
        what = "does not exist" if fresh else f"holds no checkpoint (no '{LATEST_FILE}' file, no tag)"
        if cfg.checkpoint.load_if_exists:
            if rank == 0:
                logger.info("checkpoint.load %s %s: starting from scratch (load_if_exists)", root, what)
            return None
        raise CheckpointError(
            f"checkpoint.load {root}: {what}; expected a directory written by checkpoint.save (to start from "
            "scratch when it is missing or empty, as a requeued job does, set checkpoint.load_if_exists true)"
        )
    tag, meta, skipped = found
    if rank == 0:
        for old, problems in skipped:
            logger.warning("checkpoint.load: skipping %s: %s", root / old, _problems_text(problems))
        if skipped:
            logger.warning(
                "checkpoint.load: resuming from %s, the newest complete checkpoint (%d newer tag(s) skipped)",
                root / tag,
                len(skipped),
            )
        latest = read_latest(root)
        if latest and latest != tag and TAG_RE.match(latest) and tag > latest:
            logger.info(
                "checkpoint.load: %s is newer than %s named by '%s' (its save stopped before rewriting it)",
                tag,
                latest,
                LATEST_FILE,
            )
    return tag, meta


def _check_layout(folder: Path, layout: dict[str, Any], topo, weights_only: bool, zero_stage: int) -> None:
    """The same tp/pp, and (with optimizer state) the same kind of optimizer state: ZeRO or not."""
    if (layout["tp"], layout["pp"]) != (topo.tp, topo.pp):
        raise CheckpointError(
            f"{folder} was saved with tensor_parallel={layout['tp']}, pipeline_parallel={layout['pp']} but this "
            f"run uses {topo.tp}, {topo.pp}: reshard it first with tools/convert_checkpoint.py --target-tp/--target-pp"
        )
    saved_zero = layout.get("zero_stage", 0)
    if not weights_only and (saved_zero > 0) != (zero_stage > 0):
        # ZeRO (1 and 2 share one format) and plain DeepSpeed store the optimizer state differently.
        raise CheckpointError(
            f"{folder} was saved with ZeRO stage {saved_zero} but this run has train.zero_stage "
            f"{zero_stage}: resume with train.zero_stage {'1 or 2' if saved_zero else 0}, or convert "
            "it to a weights-only checkpoint with tools/convert_checkpoint.py (the optimizer state restarts)"
        )


def _load_engine(engine, root: Path, tag: str, weights_only: bool, repartition: bool) -> dict[str, Any]:
    """DeepSpeed's load of ``tag``; its failures become one line naming the tag. Returns the client state."""
    try:
        load_path, client_state = engine.load_checkpoint(
            str(root),
            tag=tag,
            load_module_only=weights_only,
            # DeepSpeed refuses ZeRO state saved at another dp size; it is re-partitioned instead.
            load_optimizer_states=not weights_only and not repartition,
            load_lr_scheduler_states=not weights_only,
        )
    except MegatronKIError:
        raise
    except (
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        from megatron_ki.training.resilience import is_peer_failure

        if is_peer_failure(e):
            raise
        raise CheckpointError(
            f"checkpoint.load: DeepSpeed could not load {root / tag}: {first_line(e)}"
        ) from e
    if load_path is None:
        raise CheckpointError(
            f"checkpoint.load: DeepSpeed could not load {root / tag}: it found no model states file for this rank"
        )
    return client_state or {}


def load_universal_checkpoint(engine, cfg: Config, groups: ParallelGroups) -> dict[str, Any]:
    """Resume from a DeepSpeed universal checkpoint (made by ``python -m deepspeed.checkpoint.ds_to_universal
    --input_folder CKPT/stepNNN --output_folder U/stepNNN``; ``checkpoint.load`` is ``U``, whose
    ``latest_universal`` names the tag) at this run's tp and dp: fp32 master weights, Adam moments and the LR
    schedule. The universal files are named after the engine's parameters, which differ between pp = 1 and
    pp > 1 (pipeline layers): a pp = 1 checkpoint loads at pp = 1 only (tested: tp=2 -> tp=1, dp=1 -> dp=2;
    pipeline checkpoints are untested). RNG states are not restored (they belong to ranks of the old layout)."""
    root = Path(cfg.checkpoint.load)  # type: ignore[arg-type]
    latest = root / LATEST_UNIVERSAL_FILE
    if not latest.is_file():
        raise CheckpointError(
            f"checkpoint.load {root}: no '{LATEST_UNIVERSAL_FILE}' file, but checkpoint.load_universal is set: "
            "expected the parent of the --output_folder given to deepspeed.checkpoint.ds_to_universal"
        )
    tag = latest.read_text(encoding="utf-8").strip()
    folder = root / tag
    missing = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = [n for n in missing if not (folder / "zero" / n / "fp32.pt").is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint.load {folder}: not a universal checkpoint of this model: no zero/{missing[0]}/fp32.pt "
            f"(and {len(missing) - 1} more missing); parameter names differ between pipeline_parallel 1 and > 1, "
            "so a checkpoint loads only on the same side"
        )
    client = _load_engine(engine, root, tag, weights_only=False, repartition=False)
    meta = {k: client.get(k, 0) for k in ("step", "consumed_samples")}
    meta.update(layout=client.get("layout", {}), weights_only=False, universal=True)
    if groups.rank == 0:
        logger.info(
            "resumed from universal checkpoint %s at step %d (RNG states not restored)", folder, meta["step"]
        )
    return meta
