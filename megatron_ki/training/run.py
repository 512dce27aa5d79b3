"""Build one training run from its config: process groups, student and teacher, DeepSpeed engine, resume, data.

``build_run(cfg)`` returns a :class:`Run`; ``Trainer(run).fit()`` (``training/loop.py``) trains it. The entry
point and the tests that need a whole run go through these functions, in this order:

    init_distributed -> ParallelGroups -> seeds -> teacher weights -> student (+ teacher beside it at pp = 1,
    inside the pipeline stages at pp > 1) -> DeepSpeed engine -> resume -> data from where the run stopped
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_ki.config import Config, ConfigError, ModelConfig
from megatron_ki.jit import signals_deferred
from megatron_ki.ki.schedule import KISchedule, build_schedule
from megatron_ki.ki.teacher import KILossFunction
from megatron_ki.parallel import ParallelGroups, Topology
from megatron_ki.tensor_parallel import TPRngTracker, seed_everything
from megatron_ki.training.deepspeed_compat import (
    check_deepspeed_version,
    ki_pipeline_module,
    release_deepspeed_shm,
)
from megatron_ki.training.resilience import StepWatchdog

logger = logging.getLogger("megatron_ki")

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass
class RunData:
    """Batches for training (resumed at the consumed samples), and for evaluation."""

    train: Iterator[Batch]
    valid: Callable[[], Iterator[Batch]] | None
    """``() -> iterator`` for one evaluation (a fresh pass, or Megatron's continuing iterator)."""
    test: Callable[[], Iterator[Batch]] | None


@dataclass
class Run:
    """Everything one run is made of."""

    cfg: Config
    groups: ParallelGroups
    device: torch.device
    engine: Any
    loss_fn: KILossFunction
    schedule: KISchedule
    tracker: TPRngTracker | None = None
    teacher_cfg: ModelConfig | None = None
    teacher: nn.Module | None = None
    """pp = 1: the frozen teacher, run beside the engine."""
    pipe_teacher: Any = None
    """pp > 1: the teacher's layers, carried inside the pipeline stages (``models/pipe.py``)."""
    resumed: dict[str, Any] | None = None
    """Metadata of the checkpoint the run resumed from (step, consumed samples, FLOPs, seconds)."""
    data: RunData | None = None
    watchdog: StepWatchdog | None = None
    eod_token_id: int | None = None
    """The document separator recorded beside the training data (None: not recorded); saved in checkpoints,
    written as ``eos_token_id`` by the Hugging Face export."""
    tokenizer_fingerprint: dict[str, Any] | None = None
    """The content of the run's tokenizer (``data/tokenizer_identity.py``), saved in checkpoints so a run that
    uses this one as its teacher can check its own tokenizer against it."""

    @property
    def fused_head(self) -> bool:
        """The loss runs fused with the output head(s) (:func:`fused_head`): at pp = 1 the loop asks the models
        for their heads' inputs; at pp > 1 the last stage gives them (``models/pipe.py:HeadPipe``)."""
        return fused_head(self.cfg)[0]


# ---------------------------------------------------------------------------------------- processes
def collective_timeout(cfg: Config) -> timedelta:
    """The process groups' timeout: a backstop a little after the step watchdog, which names the hung rank."""
    return timedelta(seconds=cfg.train.collective_timeout_s + 30)


def init_distributed(cfg: Config) -> None:
    """DeepSpeed's comm layer over NCCL (GPU) or gloo (CPU); does nothing if it is already set up."""
    import deepspeed

    check_deepspeed_version()
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with signals_deferred():  # DeepSpeed JIT-loads its CPU comm op here, under a build lock
        deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout(cfg))
    release_deepspeed_shm()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ student, teacher
def load_teacher_weights(cfg: Config, groups: ParallelGroups) -> tuple[ModelConfig | None, dict | None]:
    """``(teacher config, this TP rank's teacher state dict or None)`` from ``ki.teacher_path`` / ``ki.teacher``."""
    from megatron_ki.convert.reshard import load_full_state, shard_state_dict
    from megatron_ki.ki.teacher import check_teacher_fits

    if not cfg.ki.enabled or cfg.ki.offline:
        return None, None
    teacher_cfg, full, source = cfg.ki.teacher, None, None
    if cfg.ki.teacher_path and cfg.ki.teacher_path.startswith("hf:"):
        # A Hugging Face directory, read tensor by tensor and sharded like the student; same tokenizer enforced.
        from megatron_ki.convert.hf import open_hf_model
        from megatron_ki.convert.tokenizer import check_teacher_tokenizer

        source = cfg.ki.teacher_path[len("hf:") :]
        saved_cfg, full = open_hf_model(
            source,
            cfg.model.make_vocab_size_divisible_by,
            attention_backend=cfg.model.attention_backend,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        where = f"the architecture of {source}/config.json"
        check_teacher_tokenizer(
            cfg.data.tokenizer_type,
            cfg.data.tokenizer_model,
            source,
            teacher_rows=saved_cfg.vocab_size,
            appended_ok=cfg.data.accept_prefix_tokenizer,
        )
    elif cfg.ki.teacher_path:
        source = cfg.ki.teacher_path
        _, saved_cfg, full = load_full_state(source)
        where = f"the architecture saved in {source}"
    if full is not None:
        if teacher_cfg is not None and teacher_cfg != saved_cfg:
            raise ConfigError("ki.teacher", f"differs from {where}")
        teacher_cfg = saved_cfg
    # a teacher with rows beyond the student's vocabulary runs on the student's (check_teacher_fits)
    teacher_cfg = check_teacher_fits(
        cfg.model, teacher_cfg, groups.topology.tp, cfg.data.seq_length, groups.topology.pp
    )
    if full is None:
        return teacher_cfg, None
    return teacher_cfg, shard_state_dict(full, teacher_cfg, groups.topology.tp, groups.tp_rank)


def fused_head(cfg: Config) -> tuple[bool, str]:
    """Whether the loss runs fused with the output head(s) (``train.fused_head_loss``), and the reason, for the
    one log line that says which path runs."""
    if not cfg.train.fused_head_loss:
        return False, "train.fused_head_loss is false"
    if cfg.ki.offline:
        return True, "the head projects the loss positions only, then the sparse loss of the offline targets"
    return True, f"chunks of {cfg.train.fused_head_chunk_tokens} loss positions, no [tokens, vocab/tp] logits"


def _paths(cfg: Config, groups: ParallelGroups) -> tuple[bool, bool]:
    """``(fused head + loss, sequence parallelism)`` for this run; rank 0 logs which paths run."""
    fused, why = fused_head(cfg)
    sp = cfg.parallel.sequence_parallel and groups.topology.tp > 1
    if groups.rank == 0:
        logger.info("output head + loss: %s (%s)", "fused" if fused else "unfused", why)
        if cfg.parallel.sequence_parallel:
            logger.info(
                "sequence parallelism: %s", f"on over {groups.topology.tp} ranks" if sp else "off (tp = 1)"
            )
    return fused, sp


def build_student_and_teacher(
    cfg: Config, groups: ParallelGroups, device: torch.device, tracker: TPRngTracker | None
) -> tuple[nn.Module, KILossFunction, ModelConfig | None, nn.Module | None, Any]:
    """``(student module, loss function, teacher config, teacher at pp = 1, pipe_teacher at pp > 1)``."""
    from megatron_ki.ki.teacher import frozen_teacher
    from megatron_ki.models import build_model
    from megatron_ki.models.pipe import PipelinedTeacher, teacher_layers_for
    from megatron_ki.training.flops import pipeline_layer_costs

    teacher_cfg, teacher_state = load_teacher_weights(cfg, groups)
    fused, sp = _paths(cfg, groups)
    loss_fn = KILossFunction(
        cfg.ki,
        groups.tp_group,
        vocab_size=cfg.model.vocab_size,
        chunk_tokens=cfg.train.fused_head_chunk_tokens,
    )
    seed = cfg.train.seed
    if cfg.parallel.pipeline_parallel == 1:
        model = build_model(cfg.model, groups.tp_group, seed, tracker, sequence_parallel=sp).to(device)
        teacher = None
        if teacher_cfg is not None:
            teacher = frozen_teacher(
                teacher_cfg, cfg.ki, groups.tp_group, teacher_state, seed + 1, device, sp
            )
        return model, loss_fn, teacher_cfg, teacher, None
    pipe_teacher = None
    if teacher_cfg is not None:
        pipe_teacher = PipelinedTeacher(
            teacher_cfg,
            seed=seed + 1,
            dtype=cfg.ki.teacher_dtype,
            state_dict=teacher_state,
            sequence_parallel=sp,
        )
    carried = teacher_layers_for(cfg.model.num_layers, teacher_cfg.num_layers) if teacher_cfg else None
    costs = pipeline_layer_costs(
        cfg.model, cfg.data.seq_length, teacher_cfg, carried, cfg.parallel.tensor_parallel
    )
    model = build_pipeline_module(
        cfg.model,
        groups.topology,
        groups,
        seed=seed,
        loss_fn=loss_fn,
        partition_method=cfg.parallel.pipeline_partition,
        rng_tracker=tracker,
        pipe_teacher=pipe_teacher,
        device=device,
        layer_costs=costs,
        head_inputs=fused,
        sequence_parallel=sp,
    )
    return model, loss_fn, teacher_cfg, None, pipe_teacher


def build_pipeline_module(
    cfg: ModelConfig,
    topology: Topology,
    groups: ParallelGroups,
    seed: int,
    loss_fn,
    partition_method: str = "parameters",
    rng_tracker: TPRngTracker | None = None,
    pipe_teacher: Any = None,
    device: torch.device | str | None = None,
    layer_costs: list[float] | None = None,
    head_inputs: bool = False,
    sequence_parallel: bool = False,
) -> nn.Module:
    """The student (and the teacher beside it, ``pipe_teacher``) as a DeepSpeed ``PipelineModule`` over
    ``topology``; the tied embedding's gradients are all-reduced over ``groups.embedding``; ``head_inputs``:
    the last stage gives ``loss_fn`` the heads' inputs, for the fused head + loss; ``sequence_parallel``: stages
    exchange sequence chunks (``parallel.sequence_parallel``).

    ``partition_method`` "compute" splits the layers so each stage gets about the same ``layer_costs`` (one per
    pipeline layer, e.g. ``training.flops.pipeline_layer_costs``: the head and a teacher's work count); the
    others are DeepSpeed's own ("parameters", "uniform")."""
    from megatron_ki.models.pipe import EmbeddingPipe, HeadPipe, pipeline_layers

    if partition_method == "compute" and (layer_costs is None or len(layer_costs) != cfg.num_layers + 2):
        raise ValueError(
            f"pipeline partition 'compute' needs one cost per pipeline layer ({cfg.num_layers + 2}), "
            f"got {None if layer_costs is None else len(layer_costs)}"
        )
    layers = pipeline_layers(
        cfg, groups.tp_group, seed, rng_tracker, pipe_teacher, device, head_inputs, sequence_parallel
    )
    module = ki_pipeline_module(
        layers,
        topology,
        groups,
        loss_fn,
        partition_method,
        layer_costs,
        tied_types=(EmbeddingPipe, HeadPipe),
        head_type=HeadPipe,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dynamic_shape=pipe_teacher is not None,
    )
    module.pipe_teacher = pipe_teacher
    return module


def teacher_config_of(path: str, make_vocab_size_divisible_by: int) -> ModelConfig:
    """The architecture of the teacher at ``ki.teacher_path`` from its config alone (no tensor read): a
    ``hf:`` directory's config.json, or the config a framework checkpoint saved. An unreadable or unsupported
    teacher is a :class:`ConfigError` at ``ki.teacher_path`` naming the path and the reason."""
    from megatron_ki.training.init_from import source_config

    return source_config(
        path, make_vocab_size_divisible_by, "ki.teacher_path", "cannot be used as a teacher"
    )[0]


def teacher_eos_ids(path: str) -> set[int]:
    """The ids the teacher at ``ki.teacher_path`` ends a document with, as far as its files say: a ``hf:``
    directory's ``eos_token_id`` in config.json and generation_config.json (an id or a list), or the
    ``eod_token_id`` a framework checkpoint recorded from its data. Empty when nothing says."""
    from megatron_ki.checkpoint_format import read_meta

    found: list[Any] = []
    if path.startswith("hf:"):
        for name in ("config.json", "generation_config.json"):
            try:
                found.append(json.loads((Path(path[len("hf:") :]) / name).read_text()).get("eos_token_id"))
            except (OSError, ValueError, AttributeError):
                continue
    else:
        found.append(read_meta(path)[1].get("eod_token_id"))
    ids = [x for v in found for x in (v if isinstance(v, list) else [v])]
    return {int(x) for x in ids if isinstance(x, int) and not isinstance(x, bool)}


def check_teacher_eod(path: str, eos: set[int], data_eod: int | None, where: str) -> None:
    """The data separates documents with an id the teacher knows as its end of document: otherwise its
    prediction after every document end teaches the student another token than the data holds."""
    if data_eod is None or not eos or data_eod in eos:
        return
    raise ConfigError(
        "ki.teacher_path",
        f"{path} ends documents with eos_token_id {sorted(eos)}, but the training data separates them with id "
        f"{data_eod} ({where}); re-run tools/preprocess_data.py with --eod-token {min(eos)} (or train with a "
        "teacher of the same separator)",
    )


def check_teacher_source(cfg: Config, world: int, data_eod: tuple[int, str] | None = None) -> None:
    """Refuse a teacher this framework cannot load, or one that does not fit the student, before any process
    group exists: one configuration error (exit 2) printed once, in seconds, instead of a failure on every
    rank after start-up. Reads configs and tokenizers only; ``load_teacher_weights`` loads the tensors.
    ``data_eod``: the document separator recorded beside the data and the file that says so."""
    from megatron_ki.config import check_teacher

    path = cfg.ki.teacher_path
    if not (cfg.ki.enabled and path):
        return
    teacher = teacher_config_of(path, cfg.model.make_vocab_size_divisible_by)
    topology = Topology.from_world(world, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    try:
        check_teacher(cfg.model, teacher, topology.tp, cfg.data.seq_length, pp=topology.pp)
    except ConfigError as e:
        raise ConfigError(
            "ki.teacher_path", f"{path} does not fit the student at '{e.key}': {e.detail}"
        ) from None
    if path.startswith("hf:"):
        from megatron_ki.convert.tokenizer import check_teacher_tokenizer

        source = path[len("hf:") :]
        check_teacher_tokenizer(
            cfg.data.tokenizer_type,
            cfg.data.tokenizer_model,
            source,
            teacher.vocab_size,
            appended_ok=cfg.data.accept_prefix_tokenizer,
        )
    if data_eod is not None:
        check_teacher_eod(path, teacher_eos_ids(path), *data_eod)


# ------------------------------------------------------------------------------------------------ data
def check_data(cfg: Config, rank: int):
    """The tokenizer (None for ``tokenizer_type none``), checked against the model, and (on rank 0) the
    datasets' files and token ids against ``model.vocab_size``. ``build_run`` calls it before the process
    group exists, so bad data fails in seconds, printed once: every rank sees the same files, and the other
    ranks wait for rank 0 in the rendezvous that follows."""
    from megatron_ki.data import build_tokenizer
    from megatron_ki.data.token_range import check_token_range, dataset_prefixes

    tokenizer = None
    if cfg.data.tokenizer_type != "none":
        tokenizer = build_tokenizer(
            cfg.data.tokenizer_type, cfg.data.tokenizer_model, option="data.tokenizer_model"
        )
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ({cfg.data.tokenizer_model})",
            )
        if cfg.model.padding_positions and cfg.model.pad_token_id != tokenizer.pad:
            # RoBERTa-style positions skip tokens equal to pad_token_id: a mismatch silently shifts them.
            raise ConfigError(
                "model.pad_token_id",
                f"{cfg.model.pad_token_id} differs from the padding id {tokenizer.pad} of {cfg.data.tokenizer_model}",
            )
    if rank == 0:  # token ids beyond the embedding: an IndexError at tp=1, silent garbage at tp>=2
        check_token_range(dataset_prefixes(cfg.data), cfg.model.vocab_size, cfg.data.cache_dir)
    return tokenizer


def teacher_fingerprint(path: str) -> tuple[dict[str, Any] | None, str]:
    """``(fingerprint | None, where it is recorded)`` of the tokenizer the teacher at ``path`` was trained
    with: a framework checkpoint's meta.json, or the ``tokenizer_fingerprint.json`` the Hugging Face export
    writes (an ``hf:`` directory without it is compared piece by piece by ``check_teacher_tokenizer``)."""
    from megatron_ki.checkpoint_format import read_meta
    from megatron_ki.data.tokenizer_identity import FIELD, read_hf_fingerprint, valid

    if path.startswith("hf:"):
        return read_hf_fingerprint(path[len("hf:") :])
    tag, meta = read_meta(path)
    fp = meta.get(FIELD)
    return (fp if valid(fp) else None), str(Path(path) / tag / "meta.json")


def check_tokenizer_identity(
    cfg: Config, tokenizer=None, rank: int = 0, teacher_path: str | None = None
) -> dict[str, Any] | None:
    """Every pairing of tokenizers a run reads, by content, before any process group exists: the datasets
    with each other, the data with ``data.tokenizer_model``, the teacher and the offline targets with the
    student's. A mismatch is one configuration error naming both sides and how they differ; what was written
    before fingerprints is accepted with one warning line (rank 0). Returns the fingerprint the run records
    in its checkpoints (the student's tokenizer, else the data's). ``teacher_path``: the teacher to check
    when the config's KI is off (the precompute)."""
    from megatron_ki.data.teacher_targets import TeacherTargetsError, read_header
    from megatron_ki.data.token_range import dataset_prefixes
    from megatron_ki.data.tokenizer_identity import (
        FIELD,
        TokenizerIdentityError,
        datasets_fingerprint,
        difference,
        fingerprint,
        pieces_of,
        unrecorded_warning,
        valid,
    )

    appended = cfg.data.accept_prefix_tokenizer
    pieces = pieces_of(tokenizer) if tokenizer is not None else None
    live = fingerprint(tokenizer, pieces) if tokenizer is not None else None
    mine = f"data.tokenizer_model {cfg.data.tokenizer_model}"
    hint = "; set data.accept_prefix_tokenizer true only if the student's tokenizer appended pieces to theirs"
    try:
        recorded, unrecorded = datasets_fingerprint(dataset_prefixes(cfg.data))
    except TokenizerIdentityError as e:
        raise ConfigError("data.data_path", str(e)) from None
    if live is not None and recorded is not None:
        diff = difference(live, recorded[0], pieces, appended, cfg.data.tokenizer_model)
        if diff is not None:
            raise ConfigError(
                "data.tokenizer_model",
                f"{cfg.data.tokenizer_model} is not the tokenizer the data was made with ({recorded[1]}): "
                f"{diff}; train with the data's tokenizer or preprocess the data again{hint}",
            )
    reference, ref_name = (live, mine) if live is not None else (recorded[0] if recorded else None, "")
    if recorded is not None and live is None:
        ref_name = f"the data ({recorded[1]})"
    others: list[tuple[str, dict | None, str]] = []
    if teacher_path is None and cfg.ki.enabled and not cfg.ki.offline:
        teacher_path = cfg.ki.teacher_path
    if teacher_path:
        fp, where = teacher_fingerprint(teacher_path)
        others.append(("ki.teacher_path", fp, where))
    if cfg.ki.enabled and cfg.ki.offline:
        for path in cfg.ki.teacher_targets:
            try:
                fp = read_header(path).get("tokenizer", {}).get(FIELD)
            except (TeacherTargetsError, OSError, ValueError):  # open_teacher_targets names it
                continue
            others.append(("ki.teacher_targets", fp if valid(fp) else None, f"{path}.idx"))
    for option, fp, where in others:
        if fp is None:
            if not (option == "ki.teacher_path" and str(teacher_path).startswith("hf:")):
                unrecorded.append(where)  # an hf: teacher's tokenizer files are compared piece by piece
            continue
        if reference is None:
            continue
        diff = difference(reference, fp, pieces if live is not None else None, appended, ref_name)
        if diff is not None:
            raise ConfigError(
                option,
                f"{where} was made with another tokenizer than {ref_name}: {diff}; KI needs the student's "
                f"tokenizer{hint}",
            )
    if unrecorded and rank == 0:
        logger.warning(unrecorded_warning(unrecorded))
    return reference


def data_eod(cfg: Config) -> tuple[int, str] | None:
    """``(id, where)``: the document separator recorded beside the training data (``eod_token_id`` in the
    datasets' .stats.json, written by tools/preprocess_data.py) and which file says so; None when no dataset
    records one. Datasets of a blend with different separators are a configuration error."""
    from megatron_ki.data import EodMismatchError, recorded_eod
    from megatron_ki.data.indexed import stats_path
    from megatron_ki.data.token_range import dataset_prefixes

    prefixes = dataset_prefixes(cfg.data)
    try:
        eod = recorded_eod(prefixes)
    except EodMismatchError as e:
        raise ConfigError("data.data_path", str(e)) from None
    if eod is None:
        return None
    source = next(p for p in prefixes if recorded_eod([p]) == eod)
    return eod, stats_path(source)


def open_teacher_targets(cfg: Config, tokenizer=None) -> dict[str, Any]:
    """The offline targets of each dataset of ``data.data_path`` (``ki.teacher_targets``, in its order),
    checked before any process group exists: computed for that very dataset (its .idx hash and token count),
    with the student's tokenizer, at ``ki.temperature``. A mismatch is a configuration error naming both sides."""
    from megatron_ki.data.teacher_targets import TeacherTargets, TeacherTargetsError
    from megatron_ki.data.token_range import dataset_prefixes

    if not cfg.ki.offline:
        return {}
    out = {}
    for prefix, path in zip(dataset_prefixes(cfg.data), cfg.ki.teacher_targets, strict=True):
        try:
            targets = TeacherTargets(path, prefix)
            if tokenizer is not None:
                targets.check_compatible(
                    tokenizer.vocab_size,
                    tokenizer_type=cfg.data.tokenizer_type,
                    tokenizer_model=cfg.data.tokenizer_model,
                )
            else:
                targets.check_compatible(cfg.model.vocab_size)
        except (TeacherTargetsError, OSError) as e:
            raise ConfigError("ki.teacher_targets", " ".join(str(e).split())) from None
        check_targets_masking(cfg, targets, tokenizer)
        if abs(targets.temperature - cfg.ki.temperature) > 1e-6 * cfg.ki.temperature:
            raise ConfigError(
                "ki.temperature",
                f"{cfg.ki.temperature} differs from the temperature {targets.temperature} the teacher targets "
                f"{path} were computed at: set ki.temperature {targets.temperature} or precompute at "
                f"{cfg.ki.temperature}",
            )
        out[prefix] = targets
    return out


def check_targets_masking(cfg: Config, targets: Any, tokenizer=None) -> None:
    """Targets of a causal teacher for a causal student; those of a masked-LM teacher for a masked-LM student
    whose static mask (seed, probabilities, special ids) is the one they were computed under."""
    from megatron_ki.data.mlm_dataset import special_mask
    from megatron_ki.data.static_mask import StaticMasking

    recorded = targets.masking
    if cfg.model.causal or recorded is None:
        if cfg.model.causal != (recorded is None):
            kind = "a causal" if recorded is None else "a masked-LM"
            raise ConfigError(
                "ki.teacher_targets",
                f"{targets.path} hold {kind} teacher's targets, but model.family {cfg.model.family!r} is "
                f"{'causal' if cfg.model.causal else 'a masked LM'}: precompute with a teacher of the same kind",
            )
        return
    special = special_mask(tokenizer) if tokenizer is not None else np.zeros(cfg.model.vocab_size, dtype=bool)
    mine = StaticMasking(cfg.data.mask_seed, cfg.data.mask_prob).describe(special)
    fields = ["scheme", "seed", "mask_prob", "random_prob", "keep_prob"]
    for key in fields + (["num_special_ids", "special_ids_sha256"] if tokenizer is not None else []):
        if recorded.get(key) != mine[key]:
            option = {"seed": "data.mask_seed", "mask_prob": "data.mask_prob"}.get(
                key, "data.tokenizer_model"
            )
            raise ConfigError(
                option,
                f"the static mask differs from the one {targets.path} were computed under: {key} "
                f"{recorded.get(key)!r} there, {mine[key]!r} here; the student must mask as the teacher saw",
            )


def attach_targets(dataset: Any, targets: dict[str, Any]) -> None:
    """Give every GPT dataset (inside blends too) the targets of its own .bin."""
    if dataset is None:
        return
    for inner in getattr(dataset, "datasets", ()):
        attach_targets(inner, targets)
    indexed = getattr(dataset, "indexed", None)
    if indexed is not None and indexed.prefix in targets:
        dataset.targets = targets[indexed.prefix]


def build_loaders(
    cfg: Config, groups: ParallelGroups, consumed_samples: int, tokenizer=None, targets: dict | None = None
) -> list:
    """Train/valid/test DataLoaders of this data-parallel rank (train resumes at ``consumed_samples``).

    ``targets`` (offline teacher targets by dataset prefix) are read only where the loss is computed: at
    pp = 1, or on the last pipeline stage (DeepSpeed's first stage reads the inputs and ignores the labels)."""
    from megatron_ki.data import PretrainingSampler, build_datasets_from_config

    if tokenizer is None and cfg.data.tokenizer_type != "none":
        tokenizer = check_data(cfg, groups.rank)
    train = cfg.train
    gbs = train.global_batch_size
    evals = (train.train_steps // train.eval_interval if train.eval_interval else 0) + 1
    if train.eval_samples == "fixed":
        evals = 1  # every evaluation re-reads the same first eval_iters global batches
    sizes = (train.train_steps * gbs, evals * train.eval_iters * gbs, train.eval_iters * gbs)
    kind = "gpt" if cfg.model.causal else "mlm"
    datasets = build_datasets_from_config(cfg.data, sizes, kind=kind, tokenizer=tokenizer)
    if targets and getattr(groups, "pp_rank", 0) == groups.topology.pp - 1:
        for ds in datasets:
            attach_targets(ds, targets)
    dp, dp_rank = groups.topology.dp, groups.dp_rank

    def loader(ds, consumed: int):
        if ds is None:
            return None
        sampler = PretrainingSampler(len(ds), consumed, train.micro_batch_size, dp_rank, dp)
        # Its own generator: starting an iterator (every fixed evaluation does) draws a worker seed, which
        # must not advance the global RNG that dropout and a bitwise resume depend on.
        return torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(train.seed),
        )

    return [loader(ds, consumed_samples if i == 0 else 0) for i, ds in enumerate(datasets)]


def batches(loader, causal: bool) -> Iterator[Batch]:
    """Model inputs and labels from a loader; re-read if evaluation asks for more than one pass."""
    from megatron_ki.training.loop import model_inputs

    while True:
        for sample in loader:
            yield model_inputs(sample, causal)


def build_data(
    cfg: Config, groups: ParallelGroups, consumed_samples: int, tokenizer=None, targets: dict | None = None
) -> RunData:
    train_loader, valid_loader, test_loader = build_loaders(cfg, groups, consumed_samples, tokenizer, targets)
    causal = cfg.model.causal
    valid = None
    if valid_loader is not None:
        if cfg.train.eval_samples == "fixed":
            valid = lambda: batches(valid_loader, causal)  # noqa: E731 - a fresh pass from the first sample
        else:
            shared = batches(valid_loader, causal)
            valid = lambda: shared  # noqa: E731 - Megatron's continuing iterator
    test = (lambda: batches(test_loader, causal)) if test_loader is not None else None
    return RunData(batches(train_loader, causal), valid, test)


# ------------------------------------------------------------------------------------------------- run
def build_run(cfg: Config, world: int | None = None, data: bool = True) -> Run:
    """Assemble the run ``cfg`` describes on this process (collective: every rank calls it)."""
    from megatron_ki.fileio import write_text_atomic
    from megatron_ki.training import checkpoint as ckpt
    from megatron_ki.training.ds_config import deepspeed_config, write_deepspeed_config
    from megatron_ki.training.engine import initialize_engine
    from megatron_ki.training.init_from import check_init_source, initialize_weights
    from megatron_ki.training.lr import lr_schedule

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    tokenizer = check_data(cfg, rank) if data else None
    eod = data_eod(cfg) if data else None
    check_teacher_source(cfg, world or int(os.environ.get("WORLD_SIZE", "1")), eod)
    check_init_source(cfg)
    targets = open_teacher_targets(cfg, tokenizer) if data else {}
    identity = check_tokenizer_identity(cfg, tokenizer, rank) if data else None
    init_distributed(cfg)
    world = dist.get_world_size() if world is None else world
    topology = Topology.from_world(world, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    groups = ParallelGroups.build(topology, timeout=collective_timeout(cfg))
    watchdog = StepWatchdog.from_env(groups.rank, world, cfg.train.collective_timeout_s)
    watchdog.start()  # heartbeats from now on; the deadline counts from the first training step
    device = default_device()
    seed_everything(cfg.train.seed + 100 * groups.pp_rank, device)
    tracker = TPRngTracker(cfg.train.seed, groups.tp_rank, device)
    model, loss_fn, teacher_cfg, teacher, pipe_teacher = build_student_and_teacher(
        cfg, groups, device, tracker
    )
    initialize_weights(model, cfg, groups)  # checkpoint.init_from, before DeepSpeed copies the weights
    if cfg.ki.enabled and not cfg.ki.offline:  # the sparse loss of offline targets uses no compiled op
        # Build (or load) the compiled KL op now: a first build inside step 1 can outlast the step watchdog,
        # which would end the job inside the build and leave torch's build lock behind for every later job.
        # The dispatch checks it against the reference here too (kernels/selfcheck.py).
        from megatron_ki.ki.loss import load_kl_ops

        load_kl_ops(device)
    if "fused_softmax" in (cfg.model.attention_backend, getattr(cfg.ki.teacher, "attention_backend", None)):
        from megatron_ki.kernels import select_backend

        for op in ("scaled_masked_softmax", "scaled_upper_triang_masked_softmax"):  # built and checked now
            select_backend(op, torch.empty(0, device=device))

    ds = deepspeed_config(cfg, world)
    if groups.rank == 0:
        run_dir = write_deepspeed_config(ds, cfg.logging.run_dir).parent
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    engine = initialize_engine(cfg, model, groups, ds)
    schedule = build_schedule(cfg.ki, lr_schedule(cfg.optim, cfg.train.train_steps), cfg.optim.lr)
    run = Run(cfg, groups, device, engine, loss_fn, schedule, tracker, teacher_cfg, teacher, pipe_teacher)
    run.watchdog = watchdog
    run.eod_token_id = eod[0] if eod else None
    run.tokenizer_fingerprint = identity
    if cfg.checkpoint.load:
        meta = ckpt.load_checkpoint(engine, cfg, groups, tracker)
        if meta is not None and not meta.get("weights_only"):
            run.resumed = meta
    if data:
        consumed = run.resumed["consumed_samples"] if run.resumed else 0
        run.data = build_data(cfg, groups, consumed, tokenizer, targets)
    return run
