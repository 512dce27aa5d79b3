"""Grow a trained model into a wider and deeper student that computes the same function (bert2BERT,
HyperCloning, G_stack), on the full (tp=1) state dicts of :mod:`megatron_ki.convert.reshard`.

Width grows by integer factors. Every student index of a grown axis copies one teacher index:
- the residual stream (hidden size ``h -> n h``) is tiled: student unit ``i`` is teacher unit ``i mod h``, so the
  student's hidden vector is ``n`` copies of the teacher's, whose LayerNorm/RMSNorm statistics are the teacher's;
- attention heads are repeated: query head ``j`` copies teacher head ``j // kq``, key/value head ``c`` copies
  ``c // kkv``, which keeps each query head's GQA group (head_dim, RoPE and the softmax scale are unchanged);
- FFN units are tiled like the residual stream (SwiGLU's gate and up halves alike).
A linear map reading a grown axis (its input) is divided by the number of copies of each input unit, so its
output is unchanged; one writing a grown axis (its output) copies rows. Tied embeddings read the residual
stream as output projection: the last norm before it is divided by ``n`` instead.

Noise breaks the copies' symmetry (without it they get equal gradients forever): on every input axis,
normal noise of ``noise`` x the tensor's standard deviation is added and its mean over each group of copies
subtracted, so the copies' contributions still add up to the teacher's (function-preserving in exact
arithmetic, HyperCloning's paired noise generalised to any number of copies).

Depth: ``identity`` inserts copies of each teacher layer after it whose output projections (attention dense
and fc2, weights and biases) are zero: exact for pre-LN blocks; a post-LN block still applies its two
LayerNorms to the residual stream, which is not the identity (:func:`depth_is_exact`). ``stack`` repeats the
whole teacher (G_stack), ``interleave`` repeats each layer in place (bert2BERT's AKI order); neither preserves
the function. Non-integer width factors are refused rather than approximated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_ki.checkpoint_format import CheckpointError
from megatron_ki.config import ModelConfig
from megatron_ki.errors import EXIT_USAGE

DepthMode = Literal["identity", "stack", "interleave"]
DEPTH_MODES: tuple[str, ...] = ("identity", "stack", "interleave")

# Fields that must be equal in teacher and student: growth changes sizes, never the kind of model.
SAME_FIELDS = (
    "family",
    "vocab_size",
    "position_embedding",
    "rope_theta",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_position_embeddings",
    "normalization",
    "norm_eps",
    "pre_norm",
    "activation",
    "add_bias_linear",
    "qk_norm",
    "sliding_window",
    "type_vocab_size",
    "pad_token_id",
    "embedding_norm",
)


class GrowError(CheckpointError):
    """The student cannot be grown from this teacher; the message says which field and why (exit 2: the
    student's configuration does not fit)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class GrowPlan:
    """How each axis grows: factors of the residual stream, query heads, key/value heads and FFN, and the
    teacher layer (and whether it is a zeroed identity copy) behind each student layer."""

    hidden: int
    q_heads: int
    kv_heads: int
    ffn: int
    layers: tuple[tuple[int, bool], ...]
    depth: str

    @property
    def function_preserving(self) -> bool:
        """Whether the depth mode keeps the function (width always does)."""
        return self.depth == "identity" or all(src == i for i, (src, _) in enumerate(self.layers))


def _factor(student: int, teacher: int, key: str, what: str) -> int:
    if student < teacher:
        raise GrowError(
            f"model.{key}: the student's {what} ({student}) is smaller than the teacher's ({teacher}); a model "
            "can only be grown (distil into a smaller student instead: ki.enabled)"
        )
    if student % teacher:
        lo, hi = teacher * (student // teacher), teacher * (student // teacher + 1)
        raise GrowError(
            f"model.{key}: the student's {what} ({student}) is not an integer multiple of the teacher's "
            f"({teacher}); width grows by integer factors only, which keep the function exactly (e.g. {lo} or {hi})"
        )
    return student // teacher


def layer_map(teacher_layers: int, student_layers: int, depth: str) -> tuple[tuple[int, bool], ...]:
    """``(teacher layer, zeroed)`` per student layer. ``identity``/``interleave``: teacher layer ``j`` fills
    student layers ``[j L_s / L, (j + 1) L_s / L)`` in order (the first copy is the teacher's layer, the
    others zeroed for ``identity``); ``stack``: student layer ``i`` is teacher layer ``i mod L``."""
    if depth not in DEPTH_MODES:
        raise GrowError(f"depth mode {depth!r}: expected one of {', '.join(DEPTH_MODES)}")
    if depth == "stack":
        return tuple((i % teacher_layers, False) for i in range(student_layers))
    out: list[tuple[int, bool]] = []
    for i in range(student_layers):
        src = i * teacher_layers // student_layers
        first = not out or out[-1][0] != src
        out.append((src, depth == "identity" and not first))
    return tuple(out)


def plan_growth(teacher: ModelConfig, student: ModelConfig, depth: str = "identity") -> GrowPlan:
    """Check that ``student`` can be grown from ``teacher`` and say how; a :class:`GrowError` names the first
    field that stands in the way (nothing is read or written before)."""
    for key in SAME_FIELDS:
        a, b = getattr(teacher, key), getattr(student, key)
        if a != b:
            raise GrowError(
                f"model.{key}: the student has {b!r}, the teacher {a!r}; growth changes sizes only, so both "
                "must have the same value"
            )
    if teacher.head_dim != student.head_dim:
        raise GrowError(
            f"model.kv_channels: the student's head_dim is {student.head_dim}, the teacher's {teacher.head_dim}; "
            "growth adds heads of the teacher's width (RoPE and the softmax scale depend on it)"
        )
    for key, a, b in (
        ("add_qkv_bias", teacher.qkv_bias, student.qkv_bias),
        ("add_mlp_bias", teacher.mlp_bias, student.mlp_bias),
    ):
        if a != b:
            raise GrowError(
                f"model.{key}: the student has {b}, the teacher {a}; both must have the same value"
            )
    if (
        teacher.position_embedding == "learned"
        and teacher.max_position_embeddings != student.max_position_embeddings
    ):
        raise GrowError(
            f"model.max_position_embeddings: the student has {student.max_position_embeddings}, the teacher "
            f"{teacher.max_position_embeddings}; learned position tables are copied, not extended"
        )
    if student.tie_word_embeddings and not teacher.tie_word_embeddings:
        raise GrowError(
            "model.tie_word_embeddings: the student ties its output projection to the embedding, the teacher "
            "has two matrices; grow into an untied student (a tied teacher grows into either)"
        )
    hidden = _factor(student.hidden_size, teacher.hidden_size, "hidden_size", "hidden size")
    q = _factor(
        student.num_attention_heads, teacher.num_attention_heads, "num_attention_heads", "query heads"
    )
    kv = _factor(student.kv_heads, teacher.kv_heads, "num_key_value_heads", "key/value heads")
    ffn = _factor(student.ffn_size, teacher.ffn_size, "ffn_hidden_size", "FFN width")
    if student.num_layers < teacher.num_layers:
        raise GrowError(
            f"model.num_layers: the student has {student.num_layers} layers, fewer than the teacher's "
            f"{teacher.num_layers}; a model can only be grown"
        )
    return GrowPlan(hidden, q, kv, ffn, layer_map(teacher.num_layers, student.num_layers, depth), depth)


def depth_is_exact(cfg: ModelConfig, plan: GrowPlan) -> bool:
    """Whether the grown model computes the teacher's function exactly (up to rounding, without noise)."""
    if plan.depth == "identity":
        return cfg.pre_norm or all(not zeroed for _, zeroed in plan.layers)
    return plan.function_preserving


# ------------------------------------------------------------------------------------------ axes
def _tile(size: int, factor: int) -> torch.Tensor:
    """Student index -> teacher index for a tiled axis."""
    return torch.arange(size * factor) % size


def _repeat_blocks(blocks: int, width: int, factor: int) -> torch.Tensor:
    """Student index -> teacher index where each block of ``width`` (a head) is repeated ``factor`` times."""
    heads = torch.arange(blocks * factor) // factor
    return (heads[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


@dataclass
class _Axes:
    """Index maps (student -> teacher) of every kind of axis."""

    hidden: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor
    ffn: torch.Tensor

    @classmethod
    def of(cls, t: ModelConfig, plan: GrowPlan) -> _Axes:
        d = t.head_dim
        return cls(
            hidden=_tile(t.hidden_size, plan.hidden),
            q=_repeat_blocks(t.num_attention_heads, d, plan.q_heads),
            kv=_repeat_blocks(t.kv_heads, d, plan.kv_heads),
            ffn=_tile(t.ffn_size, plan.ffn),
        )


def _copies(index: torch.Tensor) -> torch.Tensor:
    """For each student index, how many student indices copy the same teacher index."""
    return torch.bincount(index)[index]


def _grow_input(
    w: torch.Tensor, index: torch.Tensor, noise: float, gen: torch.Generator | None
) -> torch.Tensor:
    """Columns gathered by ``index`` and divided by their number of copies, plus zero-sum noise per group."""
    out = w.index_select(1, index) / _copies(index).to(w.dtype)
    if noise > 0 and gen is not None and index.numel() > int(index.max()) + 1:
        std = float(out.float().std()) if out.numel() > 1 else 0.0
        eps = torch.randn(out.shape, generator=gen, dtype=torch.float64) * (noise * std)
        groups = index.to(torch.long)
        sums = torch.zeros((out.shape[0], int(index.max()) + 1), dtype=torch.float64)
        sums.index_add_(1, groups, eps)
        eps -= (sums / torch.bincount(groups).to(torch.float64)).index_select(1, groups)
        out = (out.double() + eps).to(w.dtype)
    return out


def _rows(t: torch.Tensor, segments: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Rows of a (possibly fused) output axis: each ``(teacher rows, index)`` segment gathered in turn."""
    parts, start = [], 0
    for size, index in segments:
        parts.append(t.narrow(0, start, size).index_select(0, index))
        start += size
    if start != t.shape[0]:
        raise GrowError(f"a fused tensor has {t.shape[0]} rows, its segments {start}")
    return torch.cat(parts, 0)


# ------------------------------------------------------------------------------------------ growth
def grow_state_dict(
    full: Mapping[str, torch.Tensor],
    teacher: ModelConfig,
    student: ModelConfig,
    depth: str = "identity",
    noise: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The student's full (tp=1) state dict grown from the teacher's ``full`` (see the module docstring).

    ``noise`` is relative to each tensor's standard deviation (0: exact copies, which never diverge);
    ``seed`` makes the noise reproducible."""
    plan = plan_growth(teacher, student, depth)
    ax = _Axes.of(teacher, plan)
    gen = torch.Generator().manual_seed(seed) if noise > 0 else None
    t, d = teacher, teacher.head_dim
    q_rows, kv_rows = t.num_attention_heads * d, t.kv_heads * d
    fc1_segments = [(t.ffn_size, ax.ffn)] * (2 if t.activation == "swiglu" else 1)
    qkv_segments = [(q_rows, ax.q), (kv_rows, ax.kv), (kv_rows, ax.kv)]
    tied_scale = float(plan.hidden) if student.tie_word_embeddings else 1.0
    last_norm = "head.final_norm." if t.causal else "head.norm."  # the norm right before the projection

    fused_rows = {"attention.qkv": qkv_segments, "mlp.fc1": fc1_segments}  # read the residual stream
    writers = {"attention.dense": ax.q, "mlp.fc2": ax.ffn}  # write it: zeroed in an identity copy

    def grow_layer_tensor(rest: str, w: torch.Tensor, zeroed: bool) -> torch.Tensor:
        module, _, kind = rest.rpartition(".")
        if module in ("attn_norm", "mlp_norm"):
            return w.index_select(0, ax.hidden)
        if module in ("attention.q_norm", "attention.k_norm"):
            return w.clone()
        if module in fused_rows:
            rows = _rows(w, fused_rows[module])
            return rows if kind == "bias" else _grow_input(rows, ax.hidden, noise, gen)
        if module in writers:
            out = w.index_select(0, ax.hidden)
            if kind == "weight":
                out = _grow_input(out, writers[module], noise, gen)
            return torch.zeros_like(out) if zeroed else out
        raise GrowError(f"layers.*.{rest}: no growth rule for this tensor")

    def grow_other(name: str, w: torch.Tensor) -> torch.Tensor:
        if name in (
            "embedding.word_embeddings.weight",
            "embedding.position_embeddings.weight",
            "embedding.token_type_embeddings.weight",
        ):
            return w.index_select(1, ax.hidden)
        if name.startswith("embedding.norm."):
            return w.index_select(0, ax.hidden)
        if name == "head.output.weight":
            return _grow_input(w, ax.hidden, noise, gen)
        if name == "head.bias":
            return w.clone()
        if name in ("head.dense.weight",):
            return _grow_input(w.index_select(0, ax.hidden), ax.hidden, noise, gen)
        if name == "head.dense.bias":
            return w.index_select(0, ax.hidden)
        if name.startswith(("head.final_norm.", "head.norm.")):
            grown = w.index_select(0, ax.hidden)
            return grown / tied_scale if name.startswith(last_norm) else grown
        raise GrowError(f"{name}: no growth rule for this tensor")

    out: dict[str, torch.Tensor] = {}
    for name in full:
        if not name.startswith("layers."):
            out[name] = grow_other(name, full[name])
    if not student.tie_word_embeddings and "head.output.weight" not in full:
        # a tied teacher into an untied student: the output projection starts as the embedding read as input
        out["head.output.weight"] = _grow_input(
            full["embedding.word_embeddings.weight"], ax.hidden, noise, gen
        )
    prefix_names: dict[int, list[str]] = {}
    for name in full:
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            prefix_names.setdefault(int(idx), []).append(rest)
    for i, (src, zeroed) in enumerate(plan.layers):
        for rest in prefix_names[src]:
            out[f"layers.{i}.{rest}"] = grow_layer_tensor(rest, full[f"layers.{src}.{rest}"], zeroed)
    return out


# ------------------------------------------------------------------------------------------ checkpoints
def open_source(
    load: str, make_vocab_size_divisible_by: int = 128, tag: str | None = None
) -> tuple[ModelConfig, Mapping[str, torch.Tensor], dict]:
    """``(model config, lazy full state dict, metadata)`` of a framework checkpoint (any layout) or of a
    Hugging Face directory given as ``hf:DIR``. The metadata of a Hugging Face model holds its source only."""
    from .hf import open_hf_model
    from .reshard import LazyFullState

    if load.startswith("hf:"):
        cfg, state = open_hf_model(load[len("hf:") :], make_vocab_size_divisible_by)
        return cfg, state, {"source": load}
    state = LazyFullState(load, tag)
    return state.cfg, state, state.meta


def source_fingerprint(load: str, source_meta: dict) -> dict | None:
    """The tokenizer fingerprint the source records (a framework checkpoint's meta.json, a Hugging Face
    export's tokenizer_fingerprint.json), None when it records none."""
    from megatron_ki.data.tokenizer_identity import FIELD, read_hf_fingerprint, valid

    if load.startswith("hf:"):
        return read_hf_fingerprint(load[len("hf:") :])[0]
    fp = source_meta.get(FIELD)
    return fp if valid(fp) else None


def check_same_tokenizer(load: str, source_meta: dict, student_data: object) -> None:
    """The student's tokenizer (``data.tokenizer_type/model`` of its config) is the teacher's, by content: the
    fingerprint the source records, else a Hugging Face teacher's tokenizer files, else the tokenizer file a
    framework checkpoint names, compared piece by piece (the first differing id is named). A source that records
    nothing checkable is accepted with one warning; no tokenizer named by the student: only the vocabulary
    sizes are checked (:func:`plan_growth`)."""
    import logging
    from pathlib import Path

    from megatron_ki.data import build_tokenizer
    from megatron_ki.data.tokenizer_identity import difference, fingerprint, pieces_of

    from .tokenizer import (
        TokenizerMismatchError,
        check_same_vocabulary,
        check_teacher_tokenizer,
        has_hf_tokenizer,
        vocabulary,
    )

    kind, model = (
        getattr(student_data, "tokenizer_type", None),
        getattr(student_data, "tokenizer_model", None),
    )
    if kind in (None, "none") or not model:
        return
    recorded = source_fingerprint(load, source_meta)
    if recorded is not None:
        tok = build_tokenizer(kind, model)
        pieces = pieces_of(tok)
        appended = bool(getattr(student_data, "accept_prefix_tokenizer", False))
        diff = difference(fingerprint(tok, pieces), recorded, pieces, appended, str(model))
        if diff is not None:
            raise TokenizerMismatchError(
                f"teacher tokenizer (recorded in {load}) differs from the student's ({model}): {diff}"
            )
        return
    if load.startswith("hf:") and has_hf_tokenizer(load[len("hf:") :]):
        check_teacher_tokenizer(kind, model, load[len("hf:") :])
        return
    if load.startswith("hf:"):
        logging.getLogger("megatron_ki").warning(
            "%s has no tokenizer files and records no tokenizer fingerprint: its tokenizer is not checked against %s",
            load,
            model,
        )
        return
    data = (source_meta.get("config") or {}).get("data") or {}
    t_kind, t_model = data.get("tokenizer_type"), data.get("tokenizer_model")
    if t_kind in (None, "none") or not t_model or not Path(t_model).exists():
        logging.getLogger("megatron_ki").warning(
            "%s records no tokenizer fingerprint%s: its tokenizer is not checked against %s",
            load,
            f" and its tokenizer {t_model} is not there any more" if t_model else "",
            model,
        )
        return
    if Path(t_model).resolve() == Path(model).resolve():
        return
    student = vocabulary(build_tokenizer(kind, model))
    teacher = vocabulary(build_tokenizer(t_kind, t_model))
    check_same_vocabulary(student, teacher, str(model), str(t_model))
