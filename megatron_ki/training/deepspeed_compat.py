"""Every use of DeepSpeed internals, in one place, each with the DeepSpeed behaviour it works around.

Tested with DeepSpeed 0.19 (CPU/gloo here, the same code paths on NCCL); :func:`check_deepspeed_version`
refuses another major version with a clear message and logs a warning for another minor one. What is used:

- ``KIPipelineModule`` (a ``PipelineModule`` subclass):
  ``forward_funcs`` and ``_local_start`` (find the tied embedding's copies; the stage's layers by global index), ``_partition_layers``/``_set_bounds``/``parts``/``_topo``
  (DeepSpeed balances parameter or layer counts only; "compute" balances measured per-layer costs, with
  DeepSpeed's own ``partition_balanced``), ``get_tied_weights_and_groups``/``allreduce_tied_weight_gradients``
  (DeepSpeed ties weights within its pipe groups only; the student's input and output embedding are tied over
  the framework's embedding group, Megatron's scheme), and the parameter flags ``ds_pipe_replicated`` and
  ``model_parallel`` that DeepSpeed's gradient-norm code reads (so a tied copy and a TP-replicated parameter
  count once).
- ``engine.clip_fp32_gradients`` / ``engine._global_grad_norm``: DeepSpeed's fp32 (no ZeRO) clipping counts
  replicated parameters on every pipeline stage; :func:`install_gradient_clipping` replaces it.
- ``engine.skipped_steps`` and the optimizer's ``cur_scale``/``loss_scale``: read for the step metrics.
- The ZeRO 1/2 optimizer's private restore routines (``ZERO_RESTORE_METHODS``) and DeepSpeed's checkpoint
  constants: :func:`load_zero_state_at_other_dp` resumes ZeRO state at another data-parallel size.
- The name of DeepSpeed's CPU all-reduce workspace in ``/dev/shm`` (:func:`release_deepspeed_shm`): DeepSpeed
  creates one per rank and never removes it.
- The ``universal_checkpoint_info`` client state DeepSpeed's ``ds_to_universal`` reads (its pattern keys from
  ``deepspeed.checkpoint.constants``), built from the model's tensor-parallel flags
  (:func:`universal_checkpoint_info`).
- The BF16 optimizer's ``state_dict`` (:func:`mark_bf16_zero_stage` adds the ``zero_stage`` key
  ``zero_to_fp32.py`` looks for) and the names of the recovery scripts DeepSpeed copies beside a checkpoint
  (:func:`replace_recovery_scripts`, at tp or pp > 1, where they cannot work).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_ki.checkpoint_format import CheckpointError, load_torch_file, zero_partition_files
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


def pipeline_local_layers(module: nn.Module) -> list[tuple[int, nn.Module]] | None:
    """``(global pipeline layer index, layer)`` for each layer with weights on this stage of a
    ``PipelineModule`` (DeepSpeed's ``forward_funcs`` from ``_local_start``, the numbering of its
    ``layer_XX-model_YY`` files), or None for a module that is not pipelined."""
    funcs = getattr(module, "forward_funcs", None)
    if funcs is None or not hasattr(module, "_local_start"):
        return None
    start = int(module._local_start)
    return [(start + i, f) for i, f in enumerate(funcs) if isinstance(f, nn.Module)]


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
# Resume ZeRO 1/2 optimizer state at another data-parallel size.
#
# ZeRO flattens each parameter group, pads it to a multiple of ``2 x dp`` and keeps one equal slice per
# data-parallel rank (fp32 master weights and the Adam moments); its checkpoints store each rank's slice, so
# DeepSpeed refuses to load them at another dp size unless they were converted to its universal format first.
# Here every rank reads the saved slices of its own model-parallel rank, removes their padding, and hands them
# to the ZeRO optimizer's own elastic restore (the routine behind DeepSpeed's ``elastic_checkpoint``), which
# re-pads and re-slices them for the new size. The checkpoints themselves stay in DeepSpeed's per-rank
# ("rigid") format, so a resume at the same size still reads one file per rank.
#
# Cost: each rank reads all saved slices of its model-parallel rank once and DeepSpeed's restore merges them
# into one copy (the optimizer state of its model shard, about 12 bytes per parameter, in host memory), as its
# elastic checkpoints do on every load; the files are memory-mapped, so they are not held in memory as well.

ZERO_RESTORE_METHODS = (
    "_load_global_state",
    "_restore_elastic_base_optimizer_state",
    "_restore_from_elastic_fp32_weights",
    "_link_all_hp_params",
)
"""The ZeRO 1/2 optimizer's private restore routines behind DeepSpeed's ``elastic_checkpoint``."""


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
    missing = [m for m in ZERO_RESTORE_METHODS if not hasattr(opt, m)]
    if missing or not hasattr(engine, "checkpoint_mp_rank"):
        raise CheckpointError(
            f"{ckpt_dir}: DeepSpeed {deepspeed.__version__}'s ZeRO optimizer ({type(opt).__name__}) lacks "
            f"{missing or ['engine.checkpoint_mp_rank']}, needed to re-partition the optimizer state saved at "
            f"data_parallel={saved_dp}: resume with {saved_dp} data-parallel ranks"
        )
    files = zero_partition_files(ckpt_dir, engine.checkpoint_mp_rank, saved_dp)
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


# ---------------------------------------------------------------------------------- universal checkpoint
# DeepSpeed's ``ds_to_universal`` turns per-rank ZeRO files into one file per parameter and state, which any
# tp/pp/dp layout can load (``"checkpoint": {"load_universal": true}``). It merges the tensor-parallel slices
# of a parameter as the ``universal_checkpoint_info`` client state of the model-states files says: replicated
# (all slices equal), concatenated on dim 0 (the default) or 1 (row parallel), a fused weight whose per-rank
# slice holds a piece of each sub-parameter ([q_r, k_r, v_r]), and vocabulary tensors whose padding is
# stripped. Megatron-DeepSpeed writes hand-made regexes per model; here every entry is derived from the model's
# own tensor-parallel flags (``megatron_ki.models.partition_info``), so no second table of names can drift.

_VOCAB_SUFFIXES = ("word_embeddings.weight", "head.output.weight")


def universal_param_kinds(module: nn.Module, tp: int) -> dict[str, tuple]:
    """``{parameter name: kind}`` of this rank's ``module`` for the universal checkpoint: ``("replicated",)``,
    ``("column",)``, ``("row",)``, ``("vocab",)`` or ``("sub_params", dim, shape, widths)``."""
    from megatron_ki.models import partition_info

    info = partition_info(module)
    kinds: dict[str, tuple] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name not in info:
            kinds[name] = ("replicated",)
            continue
        dim, sizes = info[name]
        if len(sizes) > 1:  # a fused weight: every rank holds [piece of sub-param 0, piece of 1, ...]
            shape = tuple(tuple(sizes) if d == dim else int(s) for d, s in enumerate(p.shape))
            kinds[name] = ("sub_params", dim, shape, tuple(tuple([s // tp] * tp) for s in sizes))
        elif p.dim() == 2 and dim == 0 and name.endswith(_VOCAB_SUFFIXES):
            kinds[name] = ("vocab",)
        else:
            kinds[name] = ("row",) if dim == 1 else ("column",)
    return kinds


def _name_patterns(kinds: dict[str, tuple]) -> dict[str, tuple]:
    """``{regex: kind}``: numeric name parts (layer and pipeline indices) generalised to ``\\d+`` where every
    name so generalised has the same kind, else the exact name; anchored at both ends."""
    import re

    def general(name: str) -> str:
        return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))

    groups: dict[str, set[tuple]] = {}
    for name, kind in kinds.items():
        groups.setdefault(general(name), set()).add(kind)
    out: dict[str, tuple] = {}
    for name, kind in kinds.items():
        pattern = general(name)
        out[f"^{pattern if len(groups[pattern]) == 1 else re.escape(name)}$"] = kind
    return out


def universal_checkpoint_info(
    kinds: dict[str, tuple], vocab_size: int, padded_vocab_size: int
) -> dict[str, Any]:
    """The ``universal_checkpoint_info`` client state for parameters of ``kinds`` (every pipeline stage's,
    see :func:`universal_param_kinds`); ``vocab_size`` rows of vocabulary tensors are kept, the rest is padding."""
    from deepspeed.checkpoint import constants as c

    patterns = _name_patterns(kinds)
    by_kind: dict[str, list[str]] = {}
    for pattern, kind in patterns.items():
        by_kind.setdefault(kind[0], []).append(pattern)
    sub_params = [(p, k) for p, k in patterns.items() if k[0] == "sub_params"]
    info: dict[str, Any] = {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.ORIGINAL_VOCAB_SIZE: vocab_size,
        c.PADDED_VOCAB_SIZE: padded_vocab_size,
        c.TP_REPLICATED_PARAMETER_PATTERNS: by_kind.get("replicated", []),
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: by_kind.get("row", []),
        c.VOCABULARY_PARAMETER_PATTERNS: by_kind.get("vocab", []),
        c.PARAMETER_TO_AVERAGE_PATTERNS: [],
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [],  # the tied head copy has its own name, kept as such
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [],
        c.PARAMETER_WITH_SUB_PARAMS: [
            {"patterns": [p], "shape": k[2], "partition_dim": k[1]} for p, k in sub_params
        ],
    }
    if hasattr(c, "SUB_PARAM_SHARD_WIDTHS"):  # DeepSpeed >= 0.18 (universal version 0.4) requires the widths
        info[c.SUB_PARAM_SHARD_WIDTHS] = {p: [list(w) for w in k[3]] for p, k in sub_params}
    return info


# ----------------------------------------------------------------------------------- zero_to_fp32.py
# DeepSpeed copies its ``zero_to_fp32.py`` (and ``zero_to_torch.py``, built on it) beside every ZeRO or bf16
# checkpoint. It merges data-parallel partitions only, and recognises a ZeRO state by its ``zero_stage`` key.


def mark_bf16_zero_stage(engine) -> None:
    """Add ``zero_stage: 1`` to what DeepSpeed's BF16 optimizer (bf16 with ZeRO 0/1) saves.

    It partitions its fp32 master weights over the data-parallel ranks exactly as ZeRO-1 does (the same flat
    groups, padding and ``single_partition_of_fp32_groups``), but its state lacks the key, so
    ``zero_to_fp32.py`` refuses the checkpoint ("is not a zero checkpoint"). Loaders ignore the extra key."""
    from deepspeed.checkpoint.constants import ZERO_STAGE
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = getattr(engine, "optimizer", None)
    if not isinstance(opt, BF16_Optimizer) or getattr(opt, "_megatron_ki_marked", False):
        return
    state_dict = opt.state_dict

    def marked(*args, **kwargs):
        sd = state_dict(*args, **kwargs)
        sd.setdefault(ZERO_STAGE, 1)
        return sd

    opt.state_dict = marked
    opt._megatron_ki_marked = True


RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")

_REFUSING_SCRIPT = '''#!/usr/bin/env python
"""Put here by megatron_ki in place of DeepSpeed's {name}, which cannot read this checkpoint."""
import sys

sys.exit(
    "{name}: this checkpoint is tensor/pipeline parallel (tensor_parallel={tp}, pipeline_parallel={pp}); "
    "DeepSpeed's {name} merges data-parallel ZeRO partitions only. Export the fp32 master weights with "
    "megatron_ki's tools/convert_checkpoint.py --weights master --load {root} and --to hf --save OUT "
    "(Hugging Face) or --target-tp 1 --target-pp 1 --save OUT (a framework checkpoint)"
)
'''


def replace_recovery_scripts(root: Path, tp: int, pp: int) -> None:
    """At tp or pp > 1, replace DeepSpeed's recovery scripts in ``root`` by ones that exit with a message
    naming ``tools/convert_checkpoint.py --weights master``: DeepSpeed's fail with a misleading error (a
    file count "possibly due to an overwrite") or would merge tensor-parallel shards as data-parallel ones."""
    from megatron_ki.fileio import write_text_atomic

    if tp * pp == 1:
        return
    for name in RECOVERY_SCRIPTS:
        path = root / name
        if path.is_file():
            write_text_atomic(path, _REFUSING_SCRIPT.format(name=name, tp=tp, pp=pp, root=root.resolve()))
            path.chmod(0o755)


# --------------------------------------------------------------------------------------- stage timers
class StageTimer:
    """Wall-clock seconds this rank spends in each kind of work of a training step (``logging.stage_timers``).

    At pp > 1 each instruction of DeepSpeed's pipeline schedule (``LoadMicroBatch``, ``ForwardPass``,
    ``BackwardPass``, ``SendActivation``, ``RecvActivation``, ``SendGrad``, ``RecvGrad``, ``ReduceTiedGrads``,
    ``ReduceGrads``, ``OptimizerStep``) is timed by wrapping the engine's own instruction table on this engine
    instance (``PipelineEngine._INSTRUCTION_MAP``, which its schedule executor looks up per instruction). A
    receive's time is waiting for the neighbouring stage plus the transfer, so a stage that waits long is one
    that runs ahead of a slower neighbour. At pp = 1 the loop times ``ForwardPass``, ``BackwardPass`` and
    ``OptimizerStep`` itself through :meth:`timed`. On a GPU every timed span ends with a device synchronise,
    which costs time: a diagnostic, off by default.
    """

    def __init__(self, engine: Any = None, device: torch.device | None = None):
        self.totals: dict[str, float] = {}
        self._sync = device is not None and device.type == "cuda"
        table = getattr(type(engine), "_INSTRUCTION_MAP", None) if engine is not None else None
        if table is not None:
            engine._INSTRUCTION_MAP = {cmd: self._wrap(cmd.__name__, fn) for cmd, fn in table.items()}

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def run(engine, **kwargs):
            with self.timed(name):
                return fn(engine, **kwargs)

        return run

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """The span's seconds are added to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The seconds per kind since the last call, and start again."""
        totals, self.totals = self.totals, {}
        return totals


def stage_times(totals: dict[str, float], pp_rank: int, pp: int) -> dict[str, float]:
    """Every rank's :meth:`StageTimer.pop`, gathered: ``stage{s}_{kind}_ms`` (snake case), the mean over the
    ranks of stage ``s`` (data- and tensor-parallel ranks do the same work). A collective over all ranks."""
    gathered: list[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, (pp_rank, totals))
    else:
        gathered = [(pp_rank, totals)]
    out: dict[str, float] = {}
    for stage in range(pp):
        mine = [t for s, t in gathered if s == stage]
        for name in sorted({k for t in mine for k in t}):
            key = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
            out[f"stage{stage}_{key}_ms"] = 1000.0 * sum(t.get(name, 0.0) for t in mine) / len(mine)
    return out
