"""Framework checkpoints at any tensor/pipeline layout <-> one full (tp=1, pp=1) state dict.

A checkpoint directory holds ``latest`` (the published tag) and, per tag, DeepSpeed's files:
``mp_rank_{tp:02d}_model_states.pt`` (key ``module``) when pp = 1, or ``layer_{idx:02d}-model_{tp:02d}-
model_states.pt`` per pipeline layer when pp > 1, plus the framework's ``meta.json`` (config, step, layout).

The *full* state dict uses the single-process model's names (``embedding.*``, ``layers.{i}.*``, ``head.*``);
it keeps the source's vocabulary padding, and :func:`shard_state_dict` re-pads it for the target tp. The
layout of every tensor-parallel parameter comes from the model itself (built on the meta device, free), so
there is no second table of names to keep in sync.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import secrets
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from megatron_ki.config import Config, ModelConfig, config_from_dict, upgrade_stored_config
from megatron_ki.errors import MegatronKIError, describe_os_error
from megatron_ki.tensor_parallel import shard_rows, unshard_rows

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"


class CheckpointError(MegatronKIError, ValueError):
    """A checkpoint is missing, incomplete or does not fit; the message names the file."""


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
def read_latest(root: str | Path) -> str | None:
    path = Path(root) / LATEST_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's are paragraphs), with the next one when it
    ends in a colon (``Error(s) in loading state_dict for GPTModel:``), or the exception's type."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def read_meta_file(path: Path) -> dict[str, Any]:
    """A tag's ``meta.json``, checked for the entries every reader needs; errors name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a megatron_ki checkpoint (or an interrupted save)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({first_line(e)}): the file is truncated or corrupt, expected the metadata "
            "a save writes"
        ) from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(meta).__name__}, expected an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    for key in ("layout", "config"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{path}: no '{key}' object: truncated or not a megatron_ki checkpoint")
    return meta


def read_meta(root: str | Path, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise CheckpointError(f"checkpoint directory not found: {root} ({what})")
    given = tag
    tag = tag or read_latest(root)
    if tag is None:
        raise CheckpointError(f"{root} has no '{LATEST_FILE}' file: not a published checkpoint")
    if not tag:
        raise CheckpointError(f"{root / LATEST_FILE} is empty: expected the name of a checkpoint tag")
    if not (root / tag).is_dir():
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / META_FILE).is_file())
        found = f"tags there: {', '.join(tags)}" if tags else "no tag there has a meta.json"
        named = f"--tag {tag}" if given else f"'{LATEST_FILE}' names {tag}"
        raise CheckpointError(f"{root}: {named}, but {root / tag} does not exist ({found})")
    return tag, read_meta_file(root / tag / META_FILE)


def meta_config(meta: dict[str, Any]) -> Config:
    """The run config stored in a checkpoint's metadata (one written by an older version included)."""
    return config_from_dict(upgrade_stored_config(meta["config"]))


def load_torch_file(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` to CPU, memory-mapped when asked and the file allows it (pages are read on use).

    A missing, truncated or corrupt file raises :class:`CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            pass  # a legacy (non-zip) file cannot be memory-mapped; a broken one fails again below
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} {torch_file_problem(path) or f'cannot be read ({first_line(e)})'}"
        ) from e


def torch_file_problem(path: Path) -> str | None:
    """None if ``path`` looks like a complete ``torch.save`` file, else what is wrong with it.

    Cheap: it reads the zip archive's central directory at the end of the file (a truncated file has none),
    not the tensors. A legacy (pre-zip) pickle file cannot be checked this way and passes."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if not head:
            return "is empty (truncated)"
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "is truncated or corrupt (an empty zip archive)"
    except FileNotFoundError:
        return "is missing"
    except zipfile.BadZipFile as e:
        if head[:1] == b"\x80":  # a pickle protocol marker: torch's legacy format
            return None
        return f"is truncated or corrupt (not a readable zip archive: {first_line(e)})"
    except OSError as e:
        return f"cannot be read ({e.strerror or first_line(e)})"
    return None


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


# ------------------------------------------------------------------------------------------ writing
def is_serialization_error(e: BaseException) -> bool:
    """A ``torch.save`` failure (a full disk shows up as ``unexpected pos 311872 vs 311760``, without errno)."""
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed")
    )


def bytes_written(folder: Path) -> int:
    """Total size of the regular files under ``folder`` (0 if it does not exist)."""
    total = 0
    for p in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def write_failure(e: BaseException, directory: Path, written: int) -> str:
    """Why writing ``written`` bytes under ``directory`` failed, in words. Call it before removing what was
    written: a full disk (ENOSPC, or less free space than twice what was written) says so, with the free
    space; otherwise the OS error with its file, or the first line of torch's message."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free: int | None = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and written and free < 2 * written):
        space = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        return (
            f"no space left on device{where} ({space}, {written / 2**20:.1f} MiB written before the failure)"
        )
    if isinstance(e, OSError):
        return describe_os_error(e)
    if is_serialization_error(e) and free is not None:  # torch's message gives no cause: is the disk full?
        return f"{first_line(e)} ({free / 2**20:.0f} MiB free on its disk)"
    return first_line(e)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling directory renamed to ``final`` only if the body succeeds.

    It is made with ``os.mkdir`` (mode 0777 less the umask, like any directory the user makes: usually
    0755), not ``tempfile.mkdtemp``, whose 0700 would stay on the published checkpoint.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            "format_version": FORMAT_VERSION,
            "step": 0,
            "consumed_samples": 0,
            "layout": {"tp": tp, "pp": pp, "dp": 1, "zero_stage": 0},
            "weights_only": True,
            "config": config.to_dict(),
            **(extra_meta or {}),
        }
        write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2))
    write_text_atomic(root / LATEST_FILE, tag)
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
