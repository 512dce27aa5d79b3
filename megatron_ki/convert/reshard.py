"""Framework checkpoints at any tensor/pipeline layout <-> one full (tp=1, pp=1) state dict.

A checkpoint directory holds ``latest`` (the published tag) and, per tag, DeepSpeed's files:
``mp_rank_{tp:02d}_model_states.pt`` (key ``module``) when pp = 1, or ``layer_{idx:02d}-model_{tp:02d}-
model_states.pt`` per pipeline layer when pp > 1, plus the framework's ``meta.json`` (config, step, layout);
the format itself (names, metadata, readers and writers) is ``megatron_ki/checkpoint_format.py``.

The *full* state dict uses the single-process model's names (``embedding.*``, ``layers.{i}.*``, ``head.*``);
it keeps the source's vocabulary padding, and :func:`shard_state_dict` re-pads it for the target tp. The
layout of every tensor-parallel parameter comes from the model itself (built on the meta device, free), so
there is no second table of names to keep in sync. :class:`MasterFullState` reads the fp32 master weights of a
mixed-precision run from its ZeRO / BF16 optimizer partitions instead of the model's working-dtype weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from megatron_ki.checkpoint_format import (
    CheckpointError,
    load_torch_file,
    meta_config,
    read_meta,
    write_latest,
    write_meta,
    zero_partition_files,
)
from megatron_ki.config import Config, ModelConfig
from megatron_ki.fileio import atomic_dir
from megatron_ki.tensor_parallel import shard_rows, unshard_rows


# ------------------------------------------------------------------------------------------ layout
@lru_cache(maxsize=16)
def _layout(
    cfg_json: str,
) -> tuple[tuple[tuple[str, tuple[int, tuple[int, ...]] | None], ...], tuple[str, ...]]:
    from megatron_ki.models import build_model, partition_info

    cfg = ModelConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        model = build_model(cfg)
    info = partition_info(model)
    names = tuple(n for n, _ in model.named_parameters())
    return tuple((n, (info[n][0], tuple(info[n][1])) if n in info else None) for n in names), names


def tp_layout(cfg: ModelConfig) -> dict[str, tuple[int, list[int]] | None]:
    """``{full parameter name: (partition dim, segment sizes at tp=1) or None if replicated}``."""
    entries, _ = _layout(json.dumps(cfg.__dict__, sort_keys=True))
    return {n: (v[0], list(v[1])) if v is not None else None for n, v in entries}


def _is_vocab(name: str) -> bool:
    return name.endswith("word_embeddings.weight") or name in ("head.output.weight", "head.bias")


def _resize_vocab(t: torch.Tensor, rows: int, vocab_size: int, name: str) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        if rows < vocab_size:
            raise CheckpointError(
                f"{name}: cannot trim {t.shape[0]} vocabulary rows to {rows} < vocab {vocab_size}"
            )
        return t[:rows]
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


# ------------------------------------------------------------------------------------ shard/unshard
def unshard_state_dicts(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Join per-TP-rank state dicts (full-model names) into one full state dict."""
    layout = tp_layout(cfg)
    full = {}
    for name in shards[0]:
        info = layout.get(name)
        if name not in layout:
            raise CheckpointError(f"unexpected parameter '{name}' for a {cfg.family} model")
        if info is None:
            full[name] = shards[0][name]
            continue
        dim, sizes = info
        parts = [s[name] for s in shards]
        if len(sizes) == 1:
            full[name] = torch.cat(parts, dim=dim)
        else:
            full[name] = unshard_rows(parts, sizes, dim=dim)
    return full


def shard_state_dict(
    full: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tp: int,
    rank: int,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """This TP rank's tensors (full-model names), the vocabulary re-padded for ``tp``."""
    layout = tp_layout(cfg)
    vocab_rows = cfg.padded_vocab_size(tp)
    out = {}
    for name in names if names is not None else list(layout):
        if name not in full:
            raise CheckpointError(f"state dict has no '{name}'")
        t = full[name]
        if _is_vocab(name):
            t = _resize_vocab(t, vocab_rows, cfg.vocab_size, name)
        info = layout[name]
        if info is None:
            out[name] = t.clone()
            continue
        dim, sizes = info
        if len(sizes) == 1:
            sizes = [t.shape[dim]]
        if any(s % tp for s in sizes):
            raise CheckpointError(f"{name}: sizes {sizes} are not divisible by tensor_parallel={tp}")
        out[name] = shard_rows(t, sizes, tp, rank, dim=dim).clone()
    return out


# ------------------------------------------------------------------------------- pipeline naming
def pipe_layer_of(name: str, num_layers: int) -> tuple[int, str]:
    """Pipeline layer index and the name inside that layer for a full-model parameter name."""
    if name.startswith("embedding."):
        return 0, f"model.{name}"
    if name.startswith("head."):
        return num_layers + 1, f"model.{name}"
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        return int(idx) + 1, f"model.layers.0.{rest}"
    raise CheckpointError(f"parameter '{name}' belongs to no pipeline layer")


def full_name_of(layer_idx: int, name: str, num_layers: int) -> str:
    """Inverse of :func:`pipe_layer_of`."""
    if not name.startswith("model."):
        raise CheckpointError(f"pipeline layer {layer_idx}: unexpected key '{name}'")
    rest = name[len("model.") :]
    if 1 <= layer_idx <= num_layers:
        return f"layers.{layer_idx - 1}.{rest.split('.', 2)[2]}"
    return rest


# ------------------------------------------------------------------------------------------ reading
def load_full_state(
    root: str | Path, tag: str | None = None
) -> tuple[dict[str, Any], ModelConfig, dict[str, torch.Tensor]]:
    """``(meta, model config, full state dict)`` of a checkpoint saved at any tp/pp (any dp, ZeRO stage)."""
    tag, meta = read_meta(root, tag)
    cfg = meta_config(meta).model
    tp, pp = meta["layout"]["tp"], meta["layout"]["pp"]
    folder = Path(root) / tag
    shards: list[dict[str, torch.Tensor]] = []
    for t in range(tp):
        if pp == 1:
            shards.append(dict(load_torch_file(folder / f"mp_rank_{t:02d}_model_states.pt")["module"]))
            continue
        merged: dict[str, torch.Tensor] = {}
        for idx in range(cfg.num_layers + 2):
            layer = load_torch_file(folder / f"layer_{idx:02d}-model_{t:02d}-model_states.pt")
            for name, value in layer.items():
                full = full_name_of(idx, name, cfg.num_layers)
                if full == "head.word_embeddings.weight":  # the last stage's copy of the tied embedding
                    continue
                merged[full] = value
        shards.append(merged)
    return meta, cfg, unshard_state_dicts(shards, cfg)


class LazyFullState(Mapping[str, torch.Tensor]):
    """The full state dict of a checkpoint (like :func:`load_full_state`), each tensor read when asked for.

    Pipeline checkpoints (pp > 1) keep one pipeline layer (its files of every TP rank) in memory at a time,
    so a conversion that walks the names in order holds about one layer. The per-TP-rank files of a pp = 1
    checkpoint hold the whole model and cannot be read in parts: they are memory-mapped instead.
    """

    def __init__(self, root: str | Path, tag: str | None = None):
        tag, self.meta = read_meta(root, tag)
        self.cfg = meta_config(self.meta).model
        self.tp, self.pp = self.meta["layout"]["tp"], self.meta["layout"]["pp"]
        self.folder = Path(root) / tag
        self._names = list(tp_layout(self.cfg))
        self._cached: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self._whole: list[dict[str, torch.Tensor]] | None = None
        self.on_load: Callable[[str], None] | None = None
        """Called with each name read (progress bars)."""

    def _shards_for(self, name: str) -> list[dict[str, torch.Tensor]]:
        if self.pp == 1:
            if self._whole is None:
                self._whole = [
                    dict(
                        load_torch_file(self.folder / f"mp_rank_{t:02d}_model_states.pt", mmap=True)["module"]
                    )
                    for t in range(self.tp)
                ]
            return self._whole
        idx, _ = pipe_layer_of(name, self.cfg.num_layers)
        if self._cached is None or self._cached[0] != idx:
            self._cached = None  # drop the previous layer before reading the next
            shards = []
            for t in range(self.tp):
                layer = load_torch_file(self.folder / f"layer_{idx:02d}-model_{t:02d}-model_states.pt")
                shards.append({full_name_of(idx, k, self.cfg.num_layers): v for k, v in layer.items()})
            self._cached = (idx, shards)
        return self._cached[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        shards = self._shards_for(name)
        if name not in shards[0]:
            raise CheckpointError(f"{self.folder}: no tensor '{name}' in the files of its pipeline layer")
        t = unshard_state_dicts([{name: s[name]} for s in shards], self.cfg)[name]
        if self.on_load is not None:
            self.on_load(name)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ------------------------------------------------------------------------------------ fp32 master
# A bf16 or fp16 run keeps fp32 master weights in the optimizer, partitioned over the data-parallel ranks: ZeRO
# 1/2 and DeepSpeed's BF16 optimizer save, per data- and model-parallel rank, the flat fp32 partition
# (``single_partition_of_fp32_groups``) and where each parameter's fragment lies in it
# (``param_slice_mappings``: start, numel); a parameter's fragments in data-parallel rank order are the
# parameter. These are DeepSpeed's on-disk keys (deepspeed.checkpoint.constants), read without importing it.
_OPTIM_KEY, _SLICES_KEY, _FP32_KEY = (
    "optimizer_state_dict",
    "param_slice_mappings",
    "single_partition_of_fp32_groups",
)


def _master_of_mp_rank(folder: Path, mp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    """``{engine parameter name: fp32 master}`` of one model-parallel rank, gathered over its dp ranks."""
    shapes: dict[str, Any] = {}
    model_states = load_torch_file(folder / f"mp_rank_{mp_rank:02d}_model_states.pt", mmap=True)
    for group in model_states.get("param_shapes") or []:
        shapes.update(group)
    pieces: dict[str, list[torch.Tensor]] = {}
    for path in zero_partition_files(folder, mp_rank, dp):
        osd = load_torch_file(path, mmap=True).get(_OPTIM_KEY, {})
        if _SLICES_KEY not in osd or _FP32_KEY not in osd:
            raise CheckpointError(
                f"{path}: no '{_SLICES_KEY}'/'{_FP32_KEY}': not a ZeRO 1/2 or BF16 optimizer state"
            )
        for mapping, flat in zip(osd[_SLICES_KEY], osd[_FP32_KEY], strict=True):
            for name, frag in mapping.items():
                # The partitions are saved as Parameters: detach, or every tensor derived carries a graph.
                pieces.setdefault(name, []).append(flat.detach().narrow(0, frag.start, frag.numel))
    out = {}
    for name, parts in pieces.items():
        flat = torch.cat(parts)
        if name not in shapes or flat.numel() != torch.Size(shapes[name]).numel():
            raise CheckpointError(
                f"{folder}: fp32 master of '{name}' has {flat.numel()} values, expected shape {shapes.get(name)}"
            )
        out[name] = flat.view(shapes[name]).clone()
    return out


def master_shards(folder: Path, meta: dict[str, Any], cfg: ModelConfig) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, the fp32 master weights under full-model names (the tied head copy of pp > 1 dropped).

    Model-parallel rank ``m`` is pipeline stage ``m // tp`` and TP rank ``m % tp`` (DeepSpeed's numbering)."""
    layout = meta["layout"]
    tp, pp, dp = int(layout["tp"]), int(layout["pp"]), int(layout.get("dp", 1))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for m in range(tp * pp):
        for name, value in _master_of_mp_rank(folder, m, dp).items():
            if pp > 1:
                idx, rest = name.split(".", 1)
                name = full_name_of(int(idx), rest, cfg.num_layers)
                if name == "head.word_embeddings.weight":
                    continue
            shards[m % tp][name] = value
    return shards


class MasterFullState(LazyFullState):
    """The full state dict of a checkpoint's fp32 master weights (see :func:`master_shards`), read at once
    (4 bytes per parameter). An fp32 run has no separate master copy: its model weights are returned."""

    def __init__(self, root: str | Path, tag: str | None = None):
        super().__init__(root, tag)
        if self.meta.get("weights_only", False):
            raise CheckpointError(
                f"{self.folder} is a weights-only checkpoint (no optimizer state): it holds no fp32 master weights"
            )
        self.precision = meta_config(self.meta).train.precision
        self._master: list[dict[str, torch.Tensor]] | None = None

    def _shards_for(self, name: str) -> list[dict[str, torch.Tensor]]:
        if self.precision == "fp32":
            return super()._shards_for(name)
        if self._master is None:
            self._master = master_shards(self.folder, self.meta, self.cfg)
        return self._master


# ------------------------------------------------------------------------------------------ writing
def write_checkpoint(
    full: Mapping[str, torch.Tensor],
    config: Config,
    root: str | Path,
    tp: int,
    pp: int,
    tag: str = "converted",
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``full`` as a weights-only framework checkpoint at ``tp``/``pp`` (DeepSpeed's file layout), published
    atomically: a failure leaves no partial tag and does not touch ``latest``."""
    cfg = config.model
    if cfg.num_attention_heads % tp or cfg.kv_heads % tp or cfg.ffn_size % tp:
        raise CheckpointError(
            f"tensor_parallel={tp} does not divide heads ({cfg.num_attention_heads}), key/value heads "
            f"({cfg.kv_heads}) and FFN ({cfg.ffn_size}) of the model"
        )
    if pp > cfg.num_layers:
        raise CheckpointError(f"pipeline_parallel={pp} is more than the model's {cfg.num_layers} layers")
    root = Path(root)
    final = root / tag
    with atomic_dir(final) as folder:
        _write_shards(full, cfg, folder, tp, pp)
        meta = {
            "step": 0,
            "consumed_samples": 0,
            "layout": {"tp": tp, "pp": pp, "dp": 1, "zero_stage": 0},
            "weights_only": True,
            "config": config.to_dict(),
            **(extra_meta or {}),
        }
        write_meta(folder, meta)
    write_latest(root, tag)
    return final


def _write_shards(full: Mapping[str, torch.Tensor], cfg: ModelConfig, folder: Path, tp: int, pp: int) -> None:
    """One file per TP rank (pp = 1) or per pipeline layer and TP rank (pp > 1). Pipeline files are written
    layer by layer, so a lazily computed ``full`` (e.g. streamed from Hugging Face files) needs one layer's
    tensors in memory at a time."""
    by_layer: dict[int, list[str]] = {}
    for name in tp_layout(cfg):
        by_layer.setdefault(pipe_layer_of(name, cfg.num_layers)[0], []).append(name)
    for t in range(tp):
        if pp == 1:
            shard = shard_state_dict(full, cfg, tp, t)
            torch.save(
                {"module": shard, "global_steps": 0, "skipped_steps": 0},
                folder / f"mp_rank_{t:02d}_model_states.pt",
            )
            del shard
            continue
        for idx in range(cfg.num_layers + 2):
            names = list(by_layer.get(idx, []))
            if idx == cfg.num_layers + 1 and cfg.tie_word_embeddings:
                names.append(
                    "embedding.word_embeddings.weight"
                )  # the last stage's copy of the tied embedding
            shard = shard_state_dict(full, cfg, tp, t, names=names) if names else {}
            layer = {}
            for name, value in shard.items():
                if idx == cfg.num_layers + 1 and name.startswith("embedding."):
                    layer["model.head.word_embeddings.weight"] = value
                else:
                    layer[pipe_layer_of(name, cfg.num_layers)[1]] = value
            torch.save(layer, folder / f"layer_{idx:02d}-model_{t:02d}-model_states.pt")
