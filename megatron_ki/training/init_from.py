"""``checkpoint.init_from``: start a run from another run's weights (a grown teacher, a converted Hugging Face
model, a checkpoint at another layout), at step 0 with a fresh optimizer and the configured warm-up.

The source is read as one full state dict (:mod:`megatron_ki.convert.reshard`, any tp/pp/dp of the writer, or
``hf:DIR``) and sharded for this rank, so it need not share the run's layout. The weights go into the module
before DeepSpeed wraps it, so mixed-precision master weights start from them too. A run that resumes (its
``checkpoint.load`` holds a checkpoint, as a requeued job's does) ignores ``init_from``: the resumed weights win.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_ki.config import Config, ConfigError, ModelConfig
from megatron_ki.parallel import ParallelGroups

logger = logging.getLogger("megatron_ki")

OPTION = "checkpoint.init_from"
# What makes two models hold the same tensors with the same meaning; the rest (dropout, attention backend,
# dtype, recomputation, initialisation, vocabulary padding) is how a run trains them.
SHAPE_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_heads",
    "head_dim",
    "ffn_size",
    "vocab_size",
    "position_embedding",
    "position_table_size",
    "rope_theta",
    "rope_scaling",
    "rope_scaling_factor",
    "normalization",
    "norm_eps",
    "pre_norm",
    "activation",
    "qkv_bias",
    "mlp_bias",
    "add_bias_linear",
    "qk_norm",
    "tie_word_embeddings",
    "type_vocab_size",
    "pad_token_id",
    "embedding_norm",
)


def source_config(
    path: str, make_vocab_size_divisible_by: int, option: str = OPTION, unusable: str = "cannot be read"
) -> tuple[ModelConfig, dict[str, Any]]:
    """``(model config, metadata)`` of a model source from its config alone (no tensor read): a ``hf:``
    directory's config.json (metadata: its source only), or a framework checkpoint's meta.json. An unreadable
    or unsupported source is a :class:`ConfigError` at ``option``: ``{path}: {unusable}: {reason}``."""
    from megatron_ki.checkpoint_format import meta_config, read_meta
    from megatron_ki.convert.hf import config_from_hf, read_hf_config

    try:
        if path.startswith("hf:"):
            cfg = config_from_hf(read_hf_config(path[len("hf:") :]), make_vocab_size_divisible_by)
            return cfg, {"source": path}
        meta = read_meta(path)[1]
        return meta_config(meta).model, meta
    except (OSError, ValueError) as e:
        raise ConfigError(option, f"{path}: {unusable}: {' '.join(str(e).split())}") from None


def shape_differences(source: ModelConfig, model: ModelConfig) -> list[str]:
    """``field source != model`` for every field of :data:`SHAPE_FIELDS` that differs."""
    out = []
    for name in SHAPE_FIELDS:
        a, b = getattr(source, name), getattr(model, name)
        if a != b:
            out.append(f"{name} {a!r} there, {b!r} here")
    return out


def check_same_shape(path: str, source: ModelConfig, model: ModelConfig) -> None:
    """Refuse a source of another shape in one configuration error naming every field that differs."""
    diff = shape_differences(source, model)
    if diff:
        hint = " (grow it first: tools/grow_checkpoint.py)" if source.hidden_size <= model.hidden_size else ""
        raise ConfigError(OPTION, f"{path} holds a model of another shape: {'; '.join(diff)}{hint}")


def check_init_source(cfg: Config) -> None:
    """Refuse an ``init_from`` source of another shape or tokenizer before any process group exists: one
    configuration error (exit 2) naming the source and every field that differs."""
    from megatron_ki.convert.grow import check_same_tokenizer
    from megatron_ki.errors import MegatronKIError

    path = cfg.checkpoint.init_from
    if not path:
        return
    source, meta = source_config(path, cfg.model.make_vocab_size_divisible_by)
    check_same_shape(path, source, cfg.model)
    try:
        check_same_tokenizer(path, meta, cfg.data)
    except MegatronKIError as e:
        raise ConfigError(OPTION, f"{path}: {e}") from None


def _resuming(cfg: Config) -> bool:
    """Whether ``checkpoint.load`` will resume a checkpoint (collective within a process group)."""
    from megatron_ki.training.checkpoint import find_resume_tag

    load = cfg.checkpoint.load
    return bool(load) and Path(load).is_dir() and find_resume_tag(Path(load)) is not None


def _full_name(layer_idx: int, key: str, num_layers: int) -> str:
    from megatron_ki.convert.reshard import full_name_of

    name = full_name_of(layer_idx, key, num_layers)
    return "embedding.word_embeddings.weight" if name == "head.word_embeddings.weight" else name


def _local_targets(model: nn.Module, cfg: ModelConfig) -> list[tuple[nn.Module, dict[str, str]]]:
    """``(module, {its state-dict key: full-model name})`` for the modules this rank holds."""
    from megatron_ki.training.deepspeed_compat import pipeline_local_layers

    layers = pipeline_local_layers(model)
    if layers is None:
        return [(model, {k: k for k in model.state_dict()})]
    return [
        (layer, {k: _full_name(idx, k, cfg.num_layers) for k in layer.state_dict()}) for idx, layer in layers
    ]


def initialize_weights(model: nn.Module, cfg: Config, groups: ParallelGroups) -> bool:
    """Load ``checkpoint.init_from`` into ``model`` (this rank's part: a whole model or a pipeline stage)
    unless the run resumes; True when it loaded. Every rank calls it."""
    from megatron_ki.convert.grow import open_source
    from megatron_ki.convert.reshard import shard_state_dict

    path = cfg.checkpoint.init_from
    if not path:
        return False
    if _resuming(cfg):
        if groups.rank == 0:
            logger.info("%s %s ignored: resuming %s", OPTION, path, cfg.checkpoint.load)
        return False
    source, full, meta = open_source(path, cfg.model.make_vocab_size_divisible_by)
    check_same_shape(path, source, cfg.model)  # checked before the process group; a source rewritten since
    tp, rank = groups.topology.tp, groups.tp_rank
    for module, names in _local_targets(model, cfg.model):
        shard = shard_state_dict(full, cfg.model, tp, rank, names=sorted(set(names.values())))
        own = module.state_dict()
        picked = {k: shard[n].to(own[k].dtype) for k, n in names.items()}
        with torch.no_grad():
            module.load_state_dict(picked, strict=True)
    if groups.rank == 0:
        layout = meta.get("layout") or {}
        where = (
            f"tp={layout['tp']} pp={layout['pp']}, step {meta.get('step', 0)}" if layout else "Hugging Face"
        )
        grown = " (grown, " + meta["grown_from"]["depth"] + ")" if meta.get("grown_from") else ""
        logger.info(
            "%s: weights of %s%s (%s) loaded at tp=%d pp=%d: step 0, a new optimizer state, the configured "
            "warm-up",
            OPTION,
            path,
            grown,
            where,
            tp,
            groups.topology.pp,
        )
    return True
