"""One tensor-parallel transformer with switches for GPT-2, Llama (Qwen2, Qwen3, Mistral), BERT and RoBERTa.

The model is a sequence of separable pieces so a pipeline stage (and the KI teacher beside it) can hold
only some of them: :class:`Embedding` (ids -> hidden), ``layers`` (:class:`TransformerBlock`, hidden ->
hidden) and a head (:class:`LMHead` or :class:`MLMHead`, hidden -> vocab-sharded logits). Layout is
``[batch, seq, hidden]``; each TP rank holds its own query/key/value heads, FFN columns and vocabulary range.

Initialisation does not depend on the layout: TP layers draw the full weight and keep their shard, and each
piece is built under its own seed (:func:`seeded_init`), so the pieces of a tp=4 model or of a pipeline stage
holding layers ``[a, b)`` equal the single-process model's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributed import ProcessGroup

from megatron_ki.config import ModelConfig
from megatron_ki.dtypes import DTYPES
from megatron_ki.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPRngTracker,
    VocabParallelEmbedding,
    copy_to_tp_region,
    divide,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    normal_init,
    scaled_normal_init,
    scatter_to_sequence_region,
)

from .norms import RMSNorm, build_norm

# init-seed keys of the pieces: seed * _SEED_STRIDE + key
INIT_KEY_EMBEDDING = 0
INIT_KEY_HEAD = 1
_SEED_STRIDE = 1_000_003


def layer_init_key(layer_number: int) -> int:
    """Init-seed key of block ``layer_number`` (0-based, global over the whole model)."""
    return 2 + layer_number


@contextlib.contextmanager
def seeded_init(seed: int, key: int) -> Iterator[None]:
    """Draw the parameters built in the body from ``seed``/``key`` alone, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * _SEED_STRIDE + key)
        yield


def params_dtype(cfg: ModelConfig) -> torch.dtype:
    return DTYPES[cfg.params_dtype]


def _normal_param(shape: tuple[int, ...], std: float, dtype: torch.dtype) -> nn.Parameter:
    """Replicated parameter drawn in fp32 (like the TP layers) and cast, so draws do not depend on dtype."""
    full = torch.empty(shape, dtype=torch.float32)
    nn.init.normal_(full, mean=0.0, std=std)
    return nn.Parameter(full.to(dtype))


# ------------------------------------------------------------------------------------------- masks
def keep_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[b, s]`` mask with 1/True = attend, 0/False = padding -> bool keep mask (None stays None)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be [batch, seq] (1 = attend, 0 = padding), got {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask


def _bool_keep(
    sq: int, sk: int, causal: bool, padding_mask: torch.Tensor | None, device
) -> torch.Tensor | None:
    """Bool mask ``[b|1, 1, sq, sk]`` with True = may attend, combining causal and padding."""
    mask = None
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)[None, None]
    if padding_mask is not None:
        pad = padding_mask[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


# --------------------------------------------------------------------------------------- attention
def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    padding_mask: torch.Tensor | None,
    dropout_p: float,
    backend: str,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for ``q [b, hq, sq, d]``, ``k, v [b, hkv, sk, d]`` (hq % hkv == 0).

    ``padding_mask``: bool ``[b, sk]``, True = attend. The single place the attention backend is chosen:
    "sdpa" (torch SDPA), "eager" (matmul + fp32 softmax) or "fused_softmax" (megatron_ki.kernels). All three
    give the same result: causal masks with sq != sk align the last query with the last key, and a query
    that may attend to no key (a fully padded row) gets a zero output. Dropout on the probabilities uses the
    current default generator: callers fork the TP tracker around this.
    """
    sq, sk = q.shape[-2], k.shape[-2]
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if backend == "sdpa":
        if causal and padding_mask is None and sq == sk:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        mask = _bool_keep(sq, sk, causal, padding_mask, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if backend == "eager":
        scores = scores.float() * scale
        mask = _bool_keep(sq, sk, causal, padding_mask, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        if mask is not None:  # a query that may attend to nothing gets zeros, as with sdpa and fused_softmax
            probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        probs = probs.to(v.dtype)
    elif backend == "fused_softmax":
        from megatron_ki import kernels

        if causal and padding_mask is None and sq == sk:
            probs = kernels.scaled_upper_triang_masked_softmax(scores, scale)
        else:
            keep = _bool_keep(sq, sk, causal, padding_mask, q.device)
            masked_out = (
                torch.zeros(1, 1, sq, sk, dtype=torch.bool, device=q.device) if keep is None else ~keep
            )
            probs = kernels.scaled_masked_softmax(scores, masked_out, scale)
    else:
        raise ValueError(
            f"model.attention_backend: expected 'sdpa', 'eager' or 'fused_softmax', got {backend!r}"
        )
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def rope_inv_freq(
    head_dim: int, theta: float, cfg: ModelConfig | None = None, seq_len: int = 0
) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]``, scaled by ``cfg.rope_scaling`` exactly as transformers'
    ``modeling_rope_utils`` computes them (same fp32 operations in the same order, so logits match).

    ``seq_len`` (the largest position + 1) matters to dynamic scaling only: the base grows once it passes
    max_position_embeddings (transformers recomputes then too).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = "none" if cfg is None else cfg.rope_scaling
    if kind == "linear":
        inv_freq /= cfg.rope_scaling_factor
    elif kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        n, factor = cfg.max_position_embeddings, cfg.rope_scaling_factor
        base = theta * ((factor * torch.tensor(seq_len) / n) - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, cfg)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's smooth interpolation between kept high and divided low frequencies."""
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context_len = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    cfg: ModelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``[b, 1, s, head_dim]`` for ``position_ids [b, s]`` (HF Llama's rotate_half layout);
    ``cfg`` adds its RoPE scaling."""
    seq_len = int(position_ids.max()) + 1 if cfg is not None and cfg.rope_scaling == "dynamic" else 0
    inv_freq = rope_inv_freq(head_dim, theta, cfg, seq_len).to(position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class HeadRMSNorm(RMSNorm):
    """Qwen3's RMSNorm of each query or key head: one ``head_dim`` weight shared by all heads, replicated over
    tp. Each rank normalises only its own heads, so the weight's gradient is all-reduced over the tp group."""

    def __init__(self, head_dim: int, eps: float, dtype: torch.dtype, group: ProcessGroup | None):
        super().__init__(head_dim, eps, dtype, grad_group=group)


class SelfAttention(nn.Module):
    """Fused-QKV column-parallel projection, core attention on this rank's heads, row-parallel output."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: ProcessGroup | None = None,
        rng_tracker: TPRngTracker | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        tp = group_size(group)
        h, d, q = cfg.hidden_size, cfg.head_dim, cfg.attention_width
        kv = cfg.kv_heads * d
        dtype = params_dtype(cfg)
        self.num_heads = divide(cfg.num_attention_heads, tp, "model.num_attention_heads")
        self.num_kv_heads = divide(cfg.kv_heads, tp, "model.num_key_value_heads")
        self.head_dim = d
        self.causal = cfg.causal
        self.backend = cfg.attention_backend
        self.dropout_p = cfg.attention_dropout
        self.scale = 1.0 / math.sqrt(d)
        self.rng_tracker = rng_tracker
        self.qkv = ColumnParallelLinear(
            h,
            q + 2 * kv,
            group,
            bias=cfg.qkv_bias,
            init_method=normal_init(cfg.init_method_std),
            output_sizes=[q, kv, kv],
            dtype=dtype,
            sequence_parallel=sequence_parallel,
        )
        self.dense = RowParallelLinear(
            q,
            h,
            group,
            bias=cfg.add_bias_linear,
            init_method=scaled_normal_init(cfg.init_method_std, cfg.num_layers),
            dtype=dtype,
            sequence_parallel=sequence_parallel,
        )
        self.q_norm = HeadRMSNorm(d, cfg.norm_eps, dtype, group) if cfg.qk_norm else None
        self.k_norm = HeadRMSNorm(d, cfg.norm_eps, dtype, group) if cfg.qk_norm else None
        self.sliding_window = cfg.sliding_window

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # the whole sequence, also when x is this rank's chunk of it (sequence parallel)
        b, s, _ = qkv.shape
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        q = q.view(b, s, nq, d).transpose(1, 2)
        k = k.view(b, s, nkv, d).transpose(1, 2)
        v = v.view(b, s, nkv, d).transpose(1, 2)
        if self.sliding_window is not None and s > self.sliding_window:
            raise ValueError(
                f"sequence of {s} tokens is longer than model.sliding_window={self.sliding_window} (unsupported)"
            )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout_p = self.dropout_p if self.training else 0.0
        fork = (
            self.rng_tracker.fork()
            if (dropout_p > 0 and self.rng_tracker is not None)
            else contextlib.nullcontext()
        )
        with fork:
            ctx = core_attention(
                q,
                k,
                v,
                causal=self.causal,
                padding_mask=padding_mask,
                dropout_p=dropout_p,
                backend=self.backend,
                scale=self.scale,
            )
        return self.dense(ctx.transpose(1, 2).reshape(b, s, nq * d))


class MLP(nn.Module):
    """Column-parallel up (fused gate/up for SwiGLU), activation, row-parallel down."""

    def __init__(self, cfg: ModelConfig, group: ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        dtype = params_dtype(cfg)
        self.activation = cfg.activation
        sizes = [f, f] if cfg.activation == "swiglu" else [f]
        self.fc1 = ColumnParallelLinear(
            h,
            sum(sizes),
            group,
            bias=cfg.mlp_bias,
            init_method=normal_init(cfg.init_method_std),
            output_sizes=sizes,
            dtype=dtype,
            sequence_parallel=sequence_parallel,
        )
        self.fc2 = RowParallelLinear(
            f,
            h,
            group,
            bias=cfg.mlp_bias,
            init_method=scaled_normal_init(cfg.init_method_std, cfg.num_layers),
            dtype=dtype,
            sequence_parallel=sequence_parallel,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = activation_fn(self.activation)(y)
        return self.fc2(y)


def activation_fn(name: str):
    """Element-wise activation by ``ModelConfig.activation`` name (SwiGLU's gate uses SiLU)."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "swiglu":
        return F.silu
    raise ValueError(f"model.activation: expected 'gelu', 'gelu_tanh' or 'swiglu', got {name!r}")


def sequence_group(group: ProcessGroup | None, sequence_parallel: bool) -> ProcessGroup | None:
    """The group the sequence is split over: the tensor-parallel group with sequence parallelism at tp > 1."""
    return group if sequence_parallel and group_size(group) > 1 else None


def chunk_dropout(dropout: nn.Dropout, tracker: TPRngTracker | None, x: torch.Tensor) -> torch.Tensor:
    """``dropout(x)``; on a sequence chunk (``tracker`` given) with the TP RNG tracker's generator, so each
    rank draws its own mask rather than the same one for every chunk."""
    if tracker is None or not dropout.training or dropout.p == 0:
        return dropout(x)
    with tracker.fork():
        return dropout(x)


class TransformerBlock(nn.Module):
    """Pre-LN (GPT-2, Llama) or post-LN (BERT, RoBERTa) block: ``block(hidden, attention_mask, rotary)``.

    ``sequence_parallel`` (Megatron-LM's scheme): ``hidden`` is this rank's chunk of the sequence; the norms,
    dropout and residual adds run on it, the column-parallel projections all-gather it and the row-parallel
    ones reduce-scatter back to it (the same traffic as the all-reduces they replace); the norms' weight
    gradients are summed over the group, and the dropout draws each rank's own mask from the TP RNG tracker.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_number: int,
        group: ProcessGroup | None = None,
        rng_tracker: TPRngTracker | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        dtype = params_dtype(cfg)
        self.layer_number = layer_number
        self.pre_norm = cfg.pre_norm
        self.cfg = cfg
        norm_group = sequence_group(group, sequence_parallel)
        self.attn_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_eps, dtype, norm_group)
        self.attention = SelfAttention(cfg, group, rng_tracker, sequence_parallel)
        self.mlp_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_eps, dtype, norm_group)
        self.mlp = MLP(cfg, group, sequence_parallel)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.dropout_tracker = rng_tracker if norm_group is not None else None
        self.sequence_chunks = group_size(norm_group)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` ``[b, s]``: 1 = attend, 0 = padding. ``rotary`` defaults to positions 0..s-1."""
        pad = keep_mask(attention_mask)
        if rotary is None and self.cfg.position_embedding == "rope":
            b, s = hidden.shape[0], hidden.shape[1] * self.sequence_chunks
            pos = torch.arange(s, device=hidden.device).expand(b, s)
            rotary = rotary_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, hidden.dtype, self.cfg)
        drop = partial(chunk_dropout, self.dropout, self.dropout_tracker)
        if self.pre_norm:
            hidden = hidden + drop(self.attention(self.attn_norm(hidden), pad, rotary))
            return hidden + drop(self.mlp(self.mlp_norm(hidden)))
        hidden = self.attn_norm(hidden + drop(self.attention(hidden, pad, rotary)))
        return self.mlp_norm(hidden + drop(self.mlp(hidden)))


# --------------------------------------------------------------------------------------- embedding
def make_position_ids(input_ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Positions 0..s-1, or RoBERTa's (transformers' ``create_position_ids_from_input_ids``): the running count
    of non-pad tokens + pad_token_id, pads at pad_token_id, so ids stay below ``cfg.position_table_size``."""
    b, s = input_ids.shape
    if cfg.padding_positions:
        assert cfg.pad_token_id is not None  # checked by ModelConfig
        not_pad = (input_ids != cfg.pad_token_id).long()
        return torch.cumsum(not_pad, dim=1) * not_pad + cfg.pad_token_id
    return torch.arange(s, device=input_ids.device).expand(b, s)


# Position rows drawn in place: max_position_embeddings + 2, the table of a RoBERTa with pad id 1 (transformers'
# tokenizer) and of every config written before the offset was derived from the padding id.
_POSITION_ROWS_DRAWN_FIRST = 2


class Embedding(nn.Module):
    """Vocab-parallel word embedding (+ learned positions, token types, norm) then dropout.

    The word embedding is created first so a head that must own a tied copy can redraw it identically.
    ``sequence_parallel``: the sum is split over the sequence before the norm and the dropout, which then
    run on this rank's chunk (the norm's weight gradients summed over the group, the dropout mask drawn from
    the TP RNG tracker), and the chunk is returned.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        group: ProcessGroup | None = None,
        sequence_parallel: bool = False,
        rng_tracker: TPRngTracker | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.sequence_group = sequence_group(group, sequence_parallel)
        self.dropout_tracker = rng_tracker if self.sequence_group is not None else None
        dtype = params_dtype(cfg)
        h = cfg.hidden_size
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size(group_size(group)),
            h,
            group,
            init_method=normal_init(cfg.init_method_std),
            dtype=dtype,
        )
        self.position_embeddings = None
        if cfg.position_embedding == "learned":
            # A padding id above 1 adds rows (RoBERTa's table has max_position_embeddings + pad_token_id + 1);
            # they are drawn after the token-type table so every other draw keeps the value it always had.
            rows = cfg.position_table_size
            drawn = min(rows, cfg.max_position_embeddings + _POSITION_ROWS_DRAWN_FIRST)
            self.position_embeddings = nn.Embedding(rows, h, _weight=torch.empty((rows, h), dtype=dtype))
            with torch.no_grad():
                self.position_embeddings.weight[:drawn] = _normal_param(
                    (drawn, h), cfg.init_method_std, dtype
                )
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(
                cfg.type_vocab_size,
                h,
                _weight=_normal_param((cfg.type_vocab_size, h), cfg.init_method_std, dtype),
            )
        else:
            self.token_type_embeddings = None
        if self.position_embeddings is not None and rows > drawn:
            with torch.no_grad():
                self.position_embeddings.weight[drawn:] = _normal_param(
                    (rows - drawn, h), cfg.init_method_std, dtype
                )
        norm = build_norm(cfg.normalization, h, cfg.norm_eps, dtype, self.sequence_group)
        self.norm = norm if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = make_position_ids(input_ids, self.cfg)
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but model.type_vocab_size is 0")
        if self.sequence_group is not None:
            x = scatter_to_sequence_region(x, self.sequence_group)
        if self.norm is not None:
            x = self.norm(x)
        return chunk_dropout(self.dropout, self.dropout_tracker, x)


# -------------------------------------------------------------------------------------------- heads
@dataclass
class HeadInputs:
    """The output head's projection, not yet applied: ``logits = hidden @ weight.T + bias``, -inf on the
    vocabulary columns at and past ``vocab_size``. A model returns this instead of the logits when asked
    (``head_inputs=True``), so the loss can walk the vocabulary in chunks (``ki/fused_head.py``) and the
    ``[tokens, V/tp]`` logits never exist. ``hidden`` is the same on every tensor-parallel rank."""

    hidden: torch.Tensor
    """``[b, s, H]``: after the final norm (LM head) or the dense/activation/norm transform (MLM head)."""
    weight: torch.Tensor
    """``[V_padded/tp, H]``: this rank's vocabulary rows, tied to the word embedding or not."""
    bias: torch.Tensor | None
    """``[V_padded/tp]`` (the MLM head's) or None."""
    vocab_size: int
    """The real vocabulary; the padded columns past it are -inf."""


class _TiedOutput(nn.Module):
    """Output projection onto the (vocab-parallel) word embedding, or an untied column-parallel one.

    A head on a stage without the embedding (pipeline) owns a copy of the tied weight drawn from the
    embedding's seed; models/pipe.py keeps the copies in sync (their gradients are all-reduced).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        group: ProcessGroup | None,
        seed: int,
        owns_tied_copy: bool,
        sequence_parallel: bool,
    ):
        super().__init__()
        self.group = group
        self.sequence_group = sequence_group(group, sequence_parallel)
        self.tied = cfg.tie_word_embeddings
        self.vocab_size = cfg.vocab_size
        tp = group_size(group)
        vp = cfg.padded_vocab_size(tp)
        # Padding rows (Megatron pads the vocabulary for TP) get -inf logits: the softmax, the LM loss and the
        # KI divergence are over the real vocabulary only, as in the tokenizer and in Hugging Face exports.
        local = vp // tp
        first_pad = max(cfg.vocab_size - group_rank(group) * local, 0)
        pad = None
        if first_pad < local:
            pad = torch.zeros(local, dtype=params_dtype(cfg))
            pad[first_pad:] = float("-inf")
        self.register_buffer("padding_bias", pad, persistent=False)
        self.output = None
        self.word_embeddings = None
        if not self.tied:
            self.output = ColumnParallelLinear(
                cfg.hidden_size,
                vp,
                group,
                bias=False,
                init_method=normal_init(cfg.init_method_std),
                dtype=params_dtype(cfg),
            )
        elif owns_tied_copy:
            with seeded_init(seed, INIT_KEY_EMBEDDING):
                self.word_embeddings = VocabParallelEmbedding(
                    vp,
                    cfg.hidden_size,
                    group,
                    init_method=normal_init(cfg.init_method_std),
                    dtype=params_dtype(cfg),
                )

    def weight(self, word_embeddings_weight: torch.Tensor | None) -> torch.Tensor:
        """This rank's ``[V/tp, H]`` output rows: the untied projection's, or the (given or own) embedding's."""
        if self.output is not None:
            return self.output.weight
        if word_embeddings_weight is not None:
            return word_embeddings_weight
        if self.word_embeddings is None:
            raise ValueError("tied output head needs the word-embedding weight (none given, no own copy)")
        return self.word_embeddings.weight

    def project(self, x: torch.Tensor, word_embeddings_weight: torch.Tensor | None) -> torch.Tensor:
        return F.linear(copy_to_tp_region(x, self.group), self.weight(word_embeddings_weight))

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.padding_bias is None else logits + self.padding_bias

    def whole_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence parallel: all-gather the chunks; the projection's consumers (``project``'s
        ``copy_to_tp_region``, the fused loss) make the gradient whole on every rank, so backward splits."""
        if self.sequence_group is None:
            return x
        return gather_from_sequence_region(x, self.sequence_group, reduce_grad=False)

    def inputs(
        self, x: torch.Tensor, word_embeddings_weight: torch.Tensor | None, bias: torch.Tensor | None = None
    ) -> HeadInputs:
        """What the projection would read, for a loss that never forms the logits."""
        return HeadInputs(x, self.weight(word_embeddings_weight), bias, self.vocab_size)


class LMHead(_TiedOutput):
    """Final norm (pre-LN models) + output projection -> vocab-sharded logits ``[b, s, V_padded/tp]``.
    Sequence parallel: the norm runs on this rank's chunk, then the sequence is gathered."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: ProcessGroup | None = None,
        seed: int = 0,
        owns_tied_copy: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__(cfg, group, seed, owns_tied_copy, sequence_parallel)
        dtype = params_dtype(cfg)
        norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_eps, dtype, self.sequence_group)
        self.final_norm = norm if cfg.pre_norm else None

    def forward(
        self,
        hidden: torch.Tensor,
        word_embeddings_weight: torch.Tensor | None = None,
        head_inputs: bool = False,
    ) -> torch.Tensor | HeadInputs:
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        hidden = self.whole_sequence(hidden)
        if head_inputs:
            return self.inputs(hidden, word_embeddings_weight)
        return self.mask_padding(self.project(hidden, word_embeddings_weight))


class MLMHead(_TiedOutput):
    """BERT/RoBERTa MLM head: dense + GELU + norm, decoder (tied to the word embedding) + vocab-sharded bias.
    Sequence parallel: a pre-LN model's final norm runs on this rank's chunk, the transform on the sequence."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: ProcessGroup | None = None,
        seed: int = 0,
        owns_tied_copy: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__(cfg, group, seed, owns_tied_copy, sequence_parallel)
        dtype = params_dtype(cfg)
        h = cfg.hidden_size
        tp = group_size(group)
        final_norm = build_norm(cfg.normalization, h, cfg.norm_eps, dtype, self.sequence_group)
        self.final_norm = final_norm if cfg.pre_norm else None
        self.dense = nn.Linear(h, h, dtype=dtype)
        self.dense.weight = _normal_param((h, h), cfg.init_method_std, dtype)
        nn.init.zeros_(self.dense.bias)
        self.act = activation_fn("gelu" if cfg.activation == "swiglu" else cfg.activation)
        self.norm = build_norm(cfg.normalization, h, cfg.norm_eps, dtype)
        self.bias = nn.Parameter(torch.zeros(cfg.padded_vocab_size(tp) // tp, dtype=dtype))
        self.bias.tensor_model_parallel = True
        self.bias.partition_dim = 0

    def forward(
        self,
        hidden: torch.Tensor,
        word_embeddings_weight: torch.Tensor | None = None,
        head_inputs: bool = False,
    ) -> torch.Tensor | HeadInputs:
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        x = self.norm(self.act(self.dense(self.whole_sequence(hidden))))
        if head_inputs:
            return self.inputs(x, word_embeddings_weight, self.bias)
        return self.mask_padding(self.project(x, word_embeddings_weight) + self.bias)


# -------------------------------------------------------------------------------------------- model
def replay_tracker_contexts(tracker: TPRngTracker | None) -> tuple:
    """``context_fn`` of ``torch.utils.checkpoint``: the recomputation draws the same tensor-parallel dropout
    masks as the forward did (checkpoint itself only replays the default generators, as Megatron's
    ``CheckpointFunction`` replays its RNG tracker), and leaves the tracker where the forward left it."""
    if tracker is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    at_forward: list[torch.Tensor] = []

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        at_forward.append(tracker.generator.get_state())
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        current = tracker.generator.get_state()
        tracker.generator.set_state(at_forward[0])
        try:
            yield
        finally:
            tracker.generator.set_state(current)

    return forward(), recompute()


class TransformerLanguageModel(nn.Module):
    """Embedding -> blocks -> head, any of which a pipeline stage may leave out.

    ``layer_range=(a, b)`` builds blocks a..b-1 (with the weights they have in the full model);
    ``pre_process`` builds the embedding, ``post_process`` the head. ``sequence_parallel`` (tp > 1): between
    the embedding and the head the activations are this rank's chunk of the sequence (``TransformerBlock``);
    a model without the embedding takes, and one without the head returns, such a chunk.
    """

    head_class: type[nn.Module] = LMHead
    families: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: ProcessGroup | None = None,
        seed: int = 0,
        rng_tracker: TPRngTracker | None = None,
        layer_range: tuple[int, int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        if self.families and cfg.family not in self.families:
            raise ValueError(
                f"model.family {cfg.family!r} is not served by {type(self).__name__}; expected one of {self.families}"
            )
        start, end = layer_range if layer_range is not None else (0, cfg.num_layers)
        if not 0 <= start <= end <= cfg.num_layers:
            raise ValueError(
                f"layer_range {layer_range} must satisfy 0 <= a <= b <= model.num_layers={cfg.num_layers}"
            )
        self.cfg = cfg
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.layer_range = (start, end)
        self.pre_process, self.post_process = pre_process, post_process
        self.embedding: Embedding | None = None
        if pre_process:
            with seeded_init(seed, INIT_KEY_EMBEDDING):
                self.embedding = Embedding(cfg, tp_group, self.sequence_parallel, rng_tracker)
        blocks = []
        for i in range(start, end):
            with seeded_init(seed, layer_init_key(i)):
                blocks.append(TransformerBlock(cfg, i, tp_group, rng_tracker, self.sequence_parallel))
        self.layers = nn.ModuleList(blocks)
        self.head: nn.Module | None = None
        if post_process:
            with seeded_init(seed, INIT_KEY_HEAD):
                self.head = self.head_class(
                    cfg,
                    tp_group,
                    seed=seed,
                    owns_tied_copy=not pre_process,
                    sequence_parallel=self.sequence_parallel,
                )

    def rotary(self, position_ids: torch.Tensor | None, batch: int, seq: int, device, dtype) -> tuple | None:
        if self.cfg.position_embedding != "rope":
            return None
        if position_ids is None:
            position_ids = torch.arange(seq, device=device).expand(batch, seq)
        return rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype, self.cfg)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        head_inputs: bool = False,
    ) -> torch.Tensor | HeadInputs:
        """Vocab-sharded logits ``[b, s, V_padded/tp]`` (hidden ``[b, s, h]`` without the head).

        Without the embedding (later pipeline stage) pass ``hidden_states`` instead of ``input_ids``.
        ``head_inputs``: return the head's :class:`HeadInputs` instead of the logits (the fused loss's input).
        """
        if self.embedding is not None:
            if input_ids is None:
                raise ValueError("input_ids are required by a model with the embedding (pre_process=True)")
            hidden = self.embedding(input_ids, position_ids, token_type_ids)
        else:
            if hidden_states is None:
                raise ValueError(
                    "hidden_states are required by a model without the embedding (pre_process=False)"
                )
            hidden = hidden_states
        b, s = hidden.shape[0], hidden.shape[1] * (group_size(self.tp_group) if self.sequence_parallel else 1)
        rotary = self.rotary(position_ids, b, s, hidden.device, hidden.dtype)
        recompute = self.cfg.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                hidden = torch.utils.checkpoint.checkpoint(
                    layer,
                    hidden,
                    attention_mask,
                    rotary,
                    use_reentrant=False,
                    context_fn=partial(replay_tracker_contexts, layer.attention.rng_tracker),
                )
            else:
                hidden = layer(hidden, attention_mask=attention_mask, rotary=rotary)
        if self.head is None:
            return hidden
        weight = self.embedding.word_embeddings.weight if self.embedding is not None else None
        return self.head(hidden, weight, head_inputs=head_inputs)


# ------------------------------------------------------------------------------------------ helpers
def gather_logits(
    logits: torch.Tensor, group: ProcessGroup | None, vocab_size: int | None = None
) -> torch.Tensor:
    """All-gather vocab-sharded logits into ``[..., V_padded]`` (autograd-aware), trimmed to ``vocab_size``."""
    full = gather_from_tp_region(logits, group)
    return full[..., :vocab_size] if vocab_size is not None else full


def partition_info(model: nn.Module) -> dict[str, tuple[int, list[int]]]:
    """``{param name: (partition dim, segment sizes of the full tensor)}`` for every TP-sharded parameter.

    Pass each parameter's per-rank shards with these sizes to ``tensor_parallel.unshard_rows`` to rebuild
    the full tensor (fused QKV / gate-up weights keep their segments per rank). Replicated ones are absent.
    """
    info: dict[str, tuple[int, list[int]]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not getattr(p, "tensor_model_parallel", False):
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            dim = p.partition_dim
            if isinstance(mod, ColumnParallelLinear):
                sizes = list(mod.output_sizes)
            elif isinstance(mod, RowParallelLinear):
                sizes = [mod.input_size]
            elif isinstance(mod, VocabParallelEmbedding):
                sizes = [mod.num_embeddings]
            else:
                sizes = [p.shape[dim] * group_size(getattr(mod, "group", getattr(model, "tp_group", None)))]
            info[name] = (dim, sizes)
    return info
