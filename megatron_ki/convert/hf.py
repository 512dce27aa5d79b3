"""Hugging Face <-> framework mapping for GPT-2, Llama (Qwen2, Qwen3, Mistral), BERT and RoBERTa (transformers 5.x).

One mapping table per family relates the framework's *tp=1* state dict to the transformers one
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertForMaskedLM``, ``RobertaForMaskedLM``). Fused framework
tensors (QKV, SwiGLU gate/up) are the concatenation of several HF tensors along dim 0; GPT-2's Conv1D
weights are ``[in, out]`` and are transposed. Vocabulary-sized tensors are padded with zero rows to
``padded_vocab_size(1)`` on import and trimmed on export. Resharding to tp > 1 is a separate step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from megatron_ki.config import ModelConfig
from megatron_ki.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES
from megatron_ki.errors import MegatronKIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """One framework tensor and the HF tensor(s) it is made of."""

    ours: str
    hf: tuple[str, ...]
    transpose: bool = False
    """HF stores ``[in, out]`` (GPT-2 Conv1D)."""
    vocab: bool = False
    """Dim 0 is the vocabulary: pad on import, trim on export."""


def _layer_rules(cfg: ModelConfig, table: list[tuple[str, tuple[str, ...], bool]]) -> list[Rule]:
    rules = []
    for i in range(cfg.num_layers):
        for ours, hf, transpose in table:
            rules.append(Rule(ours.format(i=i), tuple(h.format(i=i) for h in hf), transpose))
    return rules


def _biased(
    bias: bool, pairs: list[tuple[str, tuple[str, ...], bool]]
) -> list[tuple[str, tuple[str, ...], bool]]:
    """Add the ``.bias`` twin of every ``.weight`` linear rule when that linear has a bias."""
    out = []
    for ours, hf, transpose in pairs:
        out.append((ours, hf, transpose))
        if bias and ours.endswith(".weight") and ".norm" not in ours and "_norm" not in ours:
            out.append((ours[:-7] + ".bias", tuple(h[:-7] + ".bias" for h in hf), False))
    return out


def _norm(ours: str, hf: str, cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    pairs = [(f"{ours}.weight", (f"{hf}.weight",), False)]
    if cfg.normalization == "layernorm":
        pairs.append((f"{ours}.bias", (f"{hf}.bias",), False))
    return pairs


def gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    p = "transformer.h.{i}"
    layer = [
        *_norm("layers.{i}.attn_norm", f"{p}.ln_1", cfg),
        *_biased(cfg.qkv_bias, [("layers.{i}.attention.qkv.weight", (f"{p}.attn.c_attn.weight",), True)]),
        *_biased(
            cfg.add_bias_linear, [("layers.{i}.attention.dense.weight", (f"{p}.attn.c_proj.weight",), True)]
        ),
        *_norm("layers.{i}.mlp_norm", f"{p}.ln_2", cfg),
        *_biased(cfg.mlp_bias, [("layers.{i}.mlp.fc1.weight", (f"{p}.mlp.c_fc.weight",), True)]),
        *_biased(cfg.mlp_bias, [("layers.{i}.mlp.fc2.weight", (f"{p}.mlp.c_proj.weight",), True)]),
    ]
    rules = [
        Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), vocab=True),
        Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
        *_layer_rules(cfg, layer),
        *(Rule(o, h) for o, h, _ in _norm("head.final_norm", "transformer.ln_f", cfg)),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("head.output.weight", ("lm_head.weight",), vocab=True))
    return rules


def llama_rules(cfg: ModelConfig) -> list[Rule]:
    """Llama and its kin (Qwen2, Qwen3, Mistral share the names): per-linear biases, Qwen3's q/k norms."""
    p = "model.layers.{i}"
    attn = f"{p}.self_attn"
    qk_norms = [
        (f"layers.{{i}}.attention.{x}_norm.weight", (f"{attn}.{x}_norm.weight",), False) for x in "qk"
    ]
    layer = [
        *_norm("layers.{i}.attn_norm", f"{p}.input_layernorm", cfg),
        *_biased(
            cfg.qkv_bias,
            [("layers.{i}.attention.qkv.weight", tuple(f"{attn}.{x}_proj.weight" for x in "qkv"), False)],
        ),
        *(qk_norms if cfg.qk_norm else []),
        *_biased(
            cfg.add_bias_linear, [("layers.{i}.attention.dense.weight", (f"{attn}.o_proj.weight",), False)]
        ),
        *_norm("layers.{i}.mlp_norm", f"{p}.post_attention_layernorm", cfg),
        *_biased(
            cfg.mlp_bias,
            [("layers.{i}.mlp.fc1.weight", (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"), False)],
        ),
        *_biased(cfg.mlp_bias, [("layers.{i}.mlp.fc2.weight", (f"{p}.mlp.down_proj.weight",), False)]),
    ]
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab=True),
        *_layer_rules(cfg, layer),
        *(Rule(o, h) for o, h, _ in _norm("head.final_norm", "model.norm", cfg)),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("head.output.weight", ("lm_head.weight",), vocab=True))
    return rules


def _encoder_rules(cfg: ModelConfig, prefix: str, head: dict[str, str]) -> list[Rule]:
    p = f"{prefix}.encoder.layer.{{i}}"
    layer = [
        *_biased(
            cfg.qkv_bias,
            [
                (
                    "layers.{i}.attention.qkv.weight",
                    tuple(f"{p}.attention.self.{x}.weight" for x in ("query", "key", "value")),
                    False,
                )
            ],
        ),
        *_biased(
            cfg.add_bias_linear,
            [("layers.{i}.attention.dense.weight", (f"{p}.attention.output.dense.weight",), False)],
        ),
        *_norm("layers.{i}.attn_norm", f"{p}.attention.output.LayerNorm", cfg),
        *_biased(cfg.mlp_bias, [("layers.{i}.mlp.fc1.weight", (f"{p}.intermediate.dense.weight",), False)]),
        *_biased(cfg.mlp_bias, [("layers.{i}.mlp.fc2.weight", (f"{p}.output.dense.weight",), False)]),
        *_norm("layers.{i}.mlp_norm", f"{p}.output.LayerNorm", cfg),
    ]
    e = f"{prefix}.embeddings"
    rules = [
        Rule("embedding.word_embeddings.weight", (f"{e}.word_embeddings.weight",), vocab=True),
        Rule("embedding.position_embeddings.weight", (f"{e}.position_embeddings.weight",)),
        Rule("embedding.token_type_embeddings.weight", (f"{e}.token_type_embeddings.weight",)),
        *(Rule(o, h) for o, h, _ in _norm("embedding.norm", f"{e}.LayerNorm", cfg)),
        *_layer_rules(cfg, layer),
        Rule("head.dense.weight", (f"{head['dense']}.weight",)),
        Rule("head.dense.bias", (f"{head['dense']}.bias",)),
        *(Rule(o, h) for o, h, _ in _norm("head.norm", head["norm"], cfg)),
        Rule("head.bias", (head["bias"],), vocab=True),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("head.output.weight", (f"{head['decoder']}.weight",), vocab=True))
    return rules


def bert_rules(cfg: ModelConfig) -> list[Rule]:
    head = {
        "dense": "cls.predictions.transform.dense",
        "norm": "cls.predictions.transform.LayerNorm",
        "bias": "cls.predictions.bias",
        "decoder": "cls.predictions.decoder",
    }
    return _encoder_rules(cfg, "bert", head)


def roberta_rules(cfg: ModelConfig) -> list[Rule]:
    head = {
        "dense": "lm_head.dense",
        "norm": "lm_head.layer_norm",
        "bias": "lm_head.bias",
        "decoder": "lm_head.decoder",
    }
    return _encoder_rules(cfg, "roberta", head)


# model_types mapped by llama_rules and _llama_kwargs (with their small deltas), and their causal-LM classes
LLAMA_LIKE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# transformers classes whose weights the tables cover (GPT2Model: the tied head needs no extra tensor)
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    **{mt: (arch,) for mt, arch in LLAMA_LIKE.items()},
    "bert": ("BertForMaskedLM", "BertForPreTraining"),
    "roberta": ("RobertaForMaskedLM",),
}
CAUSAL_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", **LLAMA_LIKE}
MASKED_ARCHITECTURE = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}

MAPPINGS = {
    "gpt2": gpt2_rules,
    **dict.fromkeys(LLAMA_LIKE, llama_rules),
    "bert": bert_rules,
    "roberta": roberta_rules,
}

# HF keys that alias another tensor (tied weights); written on export, not read on import
_TIED_ALIASES = {
    "gpt2": {"lm_head.weight": "embedding.word_embeddings.weight"},
    **{mt: {"lm_head.weight": "embedding.word_embeddings.weight"} for mt in LLAMA_LIKE},
    "bert": {
        "cls.predictions.decoder.weight": "embedding.word_embeddings.weight",
        "cls.predictions.decoder.bias": "head.bias",
    },
    "roberta": {
        "lm_head.decoder.weight": "embedding.word_embeddings.weight",
        "lm_head.decoder.bias": "head.bias",
    },
}


# Stored HF tensors that are not weights but buffers every model recomputes from its config (older
# transformers versions saved them): importing skips them silently. Matched against the stored names.
DERIVABLE_BUFFERS: dict[str, tuple[str, ...]] = {
    "gpt2": (r"(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)",),  # causal mask, its fill value
    **dict.fromkeys(LLAMA_LIKE, (r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)),  # RoPE
    "bert": (r"(?:bert\.)?embeddings\.(?:position_ids|token_type_ids)",),  # index buffers
    "roberta": (r"(?:roberta\.)?embeddings\.(?:position_ids|token_type_ids)",),
}
# Heads of supported architectures that the framework model does not have (the pooler, BERT's next-sentence
# head): importing drops them with a warning that names them, as transformers does for BertForMaskedLM.
UNUSED_HEADS: dict[str, tuple[str, ...]] = {
    "bert": (r"(?:bert\.)?pooler\.dense\.(?:weight|bias)", r"cls\.seq_relationship\.(?:weight|bias)"),
    "roberta": (r"(?:roberta\.)?pooler\.dense\.(?:weight|bias)",),
}


class UnmappedTensorsError(MegatronKIError, ValueError):
    """A Hugging Face checkpoint holds tensors that the mapping of its config would drop."""


def rules_for(cfg: ModelConfig) -> list[Rule]:
    """The mapping table of ``cfg.family``."""
    if cfg.family not in MAPPINGS:
        raise ValueError(
            f"model.family: no Hugging Face mapping for {cfg.family!r}; expected one of {sorted(MAPPINGS)}"
        )
    return MAPPINGS[cfg.family](cfg)


def _split_sizes(cfg: ModelConfig, rule: Rule) -> list[int]:
    if len(rule.hf) == 1:
        return []
    if "qkv" in rule.ours:
        kv = cfg.kv_heads * cfg.head_dim
        return [cfg.attention_width, kv, kv]
    return [cfg.ffn_size, cfg.ffn_size]


def _hf_source_names(rule: Rule, cfg: ModelConfig, has: Callable[[str], bool]) -> tuple[str, ...]:
    """The HF names a rule reads; MLM heads may store the output bias only as ``decoder.bias``."""
    if cfg.family in ("bert", "roberta") and rule.ours == "head.bias" and not has(rule.hf[0]):
        alias = next(k for k, v in _TIED_ALIASES[cfg.family].items() if v == "head.bias")
        if has(alias):
            return (alias,)
    return rule.hf


def rule_from_hf(
    rule: Rule, get: Callable[[str], torch.Tensor], cfg: ModelConfig, has: Callable[[str], bool]
) -> torch.Tensor:
    """The framework (tp=1, vocabulary padded) tensor of ``rule`` from HF tensors fetched one by one."""
    names = _hf_source_names(rule, cfg, has)
    missing = [k for k in names if not has(k)]
    if missing:
        raise KeyError(f"Hugging Face weights lack {missing} (needed for {rule.ours})")
    parts = [get(k).t() if rule.transpose else get(k) for k in names]
    t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    vp = cfg.padded_vocab_size(1)
    if rule.vocab and t.shape[0] != vp:
        if t.shape[0] > vp:
            raise ValueError(f"{rule.hf[0]} has {t.shape[0]} rows, more than the padded vocabulary {vp}")
        t = torch.cat([t, t.new_zeros((vp - t.shape[0], *t.shape[1:]))], dim=0)
    return t.contiguous()


def rule_to_hf(rule: Rule, t: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors (name, value) of one framework tensor: split fused tensors, transpose, trim vocabulary."""
    if rule.vocab:
        t = t[: cfg.vocab_size]
    sizes = _split_sizes(cfg, rule)
    parts = list(torch.split(t, sizes, dim=0)) if sizes else [t]
    return [(key, (part.t() if rule.transpose else part).contiguous()) for key, part in zip(rule.hf, parts)]


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Framework tp=1 state dict from a transformers one (vocab tensors zero-padded to the padded vocab)."""
    return {
        rule.ours: rule_from_hf(rule, hf_state.__getitem__, cfg, hf_state.__contains__).clone()
        for rule in rules_for(cfg)
    }


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers state dict (tied aliases included) from a framework tp=1 state dict."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules_for(cfg):
        if rule.ours not in state:
            raise KeyError(f"framework state dict lacks {rule.ours} (needed for {rule.hf})")
        for key, value in rule_to_hf(rule, state[rule.ours], cfg):
            out[key] = value.clone()
    for alias, source in tied_aliases(cfg).items():
        out[alias] = out[source]
    return out


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    """``{HF alias: HF source}`` of tensors transformers ties (and leaves out of saved files)."""
    by_ours = {r.ours: r.hf[0] for r in rules_for(cfg)}
    out = {}
    for alias, ours in _TIED_ALIASES[cfg.family].items():
        if ours == "head.bias" or cfg.tie_word_embeddings:
            out[alias] = by_ours[ours]
    return out


# -------------------------------------------------------------------------------------------- configs
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"Hugging Face config: {what}")


def _check_hf_flags(c: Any, mt: str | None) -> None:
    """Reject architectures and decoder switches the framework's models cannot reproduce."""
    archs = getattr(c, "architectures", None) or []
    if mt in ARCHITECTURES:
        bad = [a for a in archs if a not in ARCHITECTURES[mt]]
        _require(not bad, f"architectures {bad} unsupported for {mt}; expected one of {ARCHITECTURES[mt]}")
    for flag in ["add_cross_attention"] + (["is_decoder"] if mt in ("bert", "roberta") else []):
        _require(not getattr(c, flag, False), f"{flag}=True unsupported")


def _gpt2_kwargs(c: Any) -> dict[str, Any]:
    """ModelConfig fields of a GPT2Config, after rejecting attention variants we do not implement."""
    _require(
        c.activation_function in _ACT_FROM_HF,
        f"activation_function {c.activation_function!r} unsupported",
    )
    _require(
        not getattr(c, "scale_attn_by_inverse_layer_idx", False),
        "scale_attn_by_inverse_layer_idx unsupported",
    )
    _require(getattr(c, "scale_attn_weights", True), "scale_attn_weights=False unsupported")
    return dict(
        family="gpt2",
        num_layers=c.n_layer,
        hidden_size=c.n_embd,
        num_attention_heads=c.n_head,
        ffn_hidden_size=c.n_inner or 4 * c.n_embd,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.n_positions,
        position_embedding="learned",
        normalization="layernorm",
        norm_eps=c.layer_norm_epsilon,
        pre_norm=True,
        activation=_ACT_FROM_HF[c.activation_function],
        add_bias_linear=True,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        hidden_dropout=c.resid_pdrop,
        attention_dropout=c.attn_pdrop,
        init_method_std=c.initializer_range,
    )


_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _rope_kwargs(c: Any) -> dict[str, Any]:
    """RoPE fields of a Llama-like config (5.x ``rope_parameters``, or older ``rope_theta``/``rope_scaling``)."""
    _require(
        getattr(c, "pretraining_tp", 1) == 1, f"pretraining_tp={getattr(c, 'pretraining_tp', 1)} unsupported"
    )
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require(kind in _ROPE_TYPES, f"rope_type {kind!r} unsupported; expected one of {list(_ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    _require(partial in (None, 1.0), f"partial_rotary_factor {partial} unsupported (only 1.0)")
    kw: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))}
    if kind != "default":
        kw.update(rope_scaling=kind, rope_scaling_factor=float(rope["factor"]))
    if kind == "llama3":
        kw.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    return kw


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` of the exported config: the inverse of :func:`_rope_kwargs`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
    if cfg.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings
            or cfg.max_position_embeddings,
        )
    return rope


def _family_deltas(c: Any, mt: str) -> dict[str, Any]:
    """What sets Qwen2, Qwen3 and Mistral apart from Llama: linear biases, q/k norms, sliding window."""
    if mt == "llama":  # attention_bias: q, k, v and o; mlp_bias apart
        a, m = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
        return dict(add_bias_linear=a, add_mlp_bias=None if m == a else m)
    if mt == "mistral":
        return dict(add_bias_linear=False, sliding_window=getattr(c, "sliding_window", None))
    layer_types = getattr(c, "layer_types", None) or []
    window = c.sliding_window if "sliding_attention" in layer_types else None
    if mt == "qwen2":  # q, k, v biases; none on o or the MLP
        return dict(add_bias_linear=False, add_qkv_bias=True, sliding_window=window)
    a = bool(getattr(c, "attention_bias", False))  # qwen3: attention_bias on q, k, v and o; q/k norms
    return dict(add_bias_linear=a, add_mlp_bias=False if a else None, qk_norm=True, sliding_window=window)


def _llama_kwargs(c: Any, mt: str = "llama") -> dict[str, Any]:
    """ModelConfig fields of a Llama-like config (``mt`` in :data:`LLAMA_LIKE`): SwiGLU, RMSNorm, RoPE."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    own_width = head_dim * c.num_attention_heads != c.hidden_size  # Qwen3-4B, Mistral Nemo
    _require(c.hidden_act == "silu", f"hidden_act {c.hidden_act!r} unsupported (SwiGLU needs 'silu')")
    return dict(
        family=mt,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        kv_channels=head_dim if own_width else None,
        ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        position_embedding="rope",
        **_rope_kwargs(c),
        normalization="rmsnorm",
        norm_eps=c.rms_norm_eps,
        pre_norm=True,
        activation="swiglu",
        **_family_deltas(c, mt),
        tie_word_embeddings=bool(c.tie_word_embeddings),
        attention_dropout=float(c.attention_dropout),
        init_method_std=c.initializer_range,
    )


def _encoder_kwargs(c: Any, mt: str) -> dict[str, Any]:
    """ModelConfig fields of a BertConfig or RobertaConfig (post-norm, absolute learned positions)."""
    _require(c.hidden_act in _ACT_FROM_HF, f"hidden_act {c.hidden_act!r} unsupported")
    pet = getattr(c, "position_embedding_type", "absolute") or "absolute"
    _require(pet == "absolute", f"position_embedding_type {pet!r} unsupported")
    offset = 0
    if mt == "roberta":  # HF's table (max_position_embeddings) includes positions 0..padding_idx
        _require(c.pad_token_id is not None and c.pad_token_id >= 0, "roberta needs a pad_token_id")
        offset = c.pad_token_id + 1
    return dict(
        family=mt,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings - offset,
        position_embedding="learned",
        normalization="layernorm",
        norm_eps=c.layer_norm_eps,
        pre_norm=False,
        activation=_ACT_FROM_HF[c.hidden_act],
        add_bias_linear=True,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_token_id,
        embedding_norm=True,
        hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
        init_method_std=c.initializer_range,
    )


def config_from_hf(hf_config: Any, make_vocab_size_divisible_by: int = 128, **overrides: Any) -> ModelConfig:
    """ModelConfig equivalent to a transformers config of a supported model_type (``overrides`` win)."""
    mt = getattr(hf_config, "model_type", None)
    _require(mt in ARCHITECTURES, f"model_type {mt!r} unsupported; expected one of {sorted(ARCHITECTURES)}")
    _check_hf_flags(hf_config, mt)
    if mt == "gpt2":
        kw = _gpt2_kwargs(hf_config)
    elif mt in LLAMA_LIKE:
        kw = _llama_kwargs(hf_config, mt)
    else:
        kw = _encoder_kwargs(hf_config, mt)
    kw["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    kw.update(overrides)
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> Any:
    """The transformers config of the same architecture (GPT2Config, LlamaConfig, BertConfig, RobertaConfig)."""
    import transformers

    if cfg.family == "gpt2":
        _require(cfg.activation in _ACT_TO_HF, f"model.activation {cfg.activation!r} has no GPT-2 equivalent")
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_attention_heads,
            n_inner=cfg.ffn_size,
            activation_function=_ACT_TO_HF[cfg.activation],
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout,
            attn_pdrop=cfg.attention_dropout,
            initializer_range=cfg.init_method_std,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    if cfg.family in LLAMA_LIKE:
        return _llama_config_to_hf(cfg)
    if cfg.family in ("bert", "roberta"):
        _require(cfg.activation in _ACT_TO_HF, f"model.activation {cfg.activation!r} has no BERT equivalent")
        cls = transformers.BertConfig if cfg.family == "bert" else transformers.RobertaConfig
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_size,
            hidden_act=cfg.activation if cfg.activation == "gelu" else "gelu_new",
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=cfg.position_table_size,  # RoBERTa: + pad_token_id + 1 (514 for base)
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps,
            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            initializer_range=cfg.init_method_std,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    raise ValueError(f"model.family: no Hugging Face config for {cfg.family!r}")


def _llama_config_to_hf(cfg: ModelConfig) -> Any:
    """LlamaConfig, Qwen2Config, Qwen3Config or MistralConfig; refuses switches the family cannot express."""
    import transformers

    cls = getattr(transformers, LLAMA_LIKE[cfg.family].replace("ForCausalLM", "Config"))
    window = cfg.sliding_window
    deltas: dict[str, Any] = {
        "llama": dict(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.mlp_bias),
        "mistral": dict(sliding_window=window),
        "qwen2": dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0),
        "qwen3": dict(
            attention_bias=cfg.add_bias_linear, use_sliding_window=window is not None, sliding_window=window
        ),
    }[cfg.family]
    if cfg.family == "qwen3":
        deltas["max_window_layers"] = 0
    if cfg.family != "qwen2" or cfg.kv_channels is not None:  # Qwen2Config has no head_dim field of its own
        deltas["head_dim"] = cfg.head_dim
    hf = cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_to_hf(cfg),
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_method_std,
        **deltas,
    )
    expected = {**dict.fromkeys(("add_qkv_bias", "add_mlp_bias", "sliding_window")), "qk_norm": False}
    expected.update(_family_deltas(hf, cfg.family))
    lost = [f"model.{k}={getattr(cfg, k)!r}" for k, v in expected.items() if getattr(cfg, k) != v]
    _require(not lost, f"{cls.__name__} cannot express {', '.join(lost)} (family {cfg.family})")
    return hf


def load_hf_model(hf_model: Any, make_vocab_size_divisible_by: int = 128, seed: int = 0, **overrides: Any):
    """A single-process framework model holding a transformers model's weights: ``(model, cfg)``."""
    from megatron_ki.models import build_model

    cfg = config_from_hf(hf_model.config, make_vocab_size_divisible_by, **overrides)
    model = build_model(cfg, seed=seed)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in from_hf_state_dict(hf_model.state_dict(), cfg).items()}
    model.load_state_dict(state, strict=True)
    return model, cfg


# ------------------------------------------------------------------------------------- files on disk
_BASE_PREFIXES = ("transformer.", "model.", "bert.", "roberta.")


class HFWeights:
    """The tensors of a Hugging Face model directory, read one at a time.

    safetensors files are read with plain ``readinto`` (no memory map), so only the tensors being converted
    are in memory. ``pytorch_model*.bin`` files cannot be read partially: each is memory-mapped
    (``torch.load(mmap=True)``), whose pages the kernel may keep resident while it is open.
    Names saved from a base model (``h.0...`` for ``transformer.h.0...``) are found too.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        self._bin: dict[str, torch.Tensor] = {}
        files = self._files()
        for f in files:
            if f.suffix == ".safetensors":
                self._index_safetensors(f)
            else:
                self._bin.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))

    def _files(self) -> list[Path]:
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (self.path / index).is_file():
                weight_map = json.loads((self.path / index).read_text(encoding="utf-8"))["weight_map"]
                files = [self.path / f for f in dict.fromkeys(weight_map.values())]
                for f in files:
                    if not f.is_file():
                        raise FileNotFoundError(f"{f}: listed in {self.path / index} but missing")
                return files
            if (self.path / single).is_file():
                return [self.path / single]
        raise FileNotFoundError(
            f"{self.path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found"
        )

    def _index_safetensors(self, f: Path) -> None:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{f}: tensor {name} has dtype {info['dtype']}, not supported")
            b, e = info["data_offsets"]
            self._where[name] = (f, info["dtype"], list(info["shape"]), start + b, start + e)

    def _resolve(self, name: str) -> str | None:
        if name in self._where or name in self._bin:
            return name
        for prefix in _BASE_PREFIXES:
            if name.startswith(prefix) and (
                name[len(prefix) :] in self._where or name[len(prefix) :] in self._bin
            ):
                return name[len(prefix) :]
        return None

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def keys(self) -> list[str]:
        return [*self._where, *self._bin]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise KeyError(f"{self.path}: the weights hold no tensor '{name}'")
        if key in self._bin:
            return self._bin[key]
        f, dtype, shape, begin, end = self._where[key]
        out = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
        view = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if view is not None:
            with open(f, "rb") as fh:
                fh.seek(begin)
                if fh.readinto(memoryview(view)) != end - begin:
                    raise ValueError(f"{f}: tensor {key} is truncated")
        return out


class LazyState(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are computed when asked for (and not kept): streams conversions."""

    def __init__(
        self, names: list[str], load: Callable[[str], torch.Tensor], on_load: Callable | None = None
    ):
        self._names = list(names)
        self._set = set(names)
        self._load = load
        self.on_load = on_load

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        t = self._load(name)
        if self.on_load is not None:
            self.on_load(name)
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def unmapped_hf_tensors(weights: HFWeights, cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """``(unmapped, unused_heads)``: the stored tensors of ``weights`` that no rule of ``cfg`` reads.

    Tensors read by a rule, tied aliases of those (``lm_head.weight`` of a tied model, the MLM decoder) and
    :data:`DERIVABLE_BUFFERS` are accounted for; :data:`UNUSED_HEADS` are returned apart. Anything else in
    ``unmapped`` would be lost by an import, e.g. q/k/v biases of a Qwen2 checkpoint under a Llama
    ``config.json`` without ``attention_bias``.
    """
    used: set[str] = set()
    names = [n for rule in rules_for(cfg) for n in _hf_source_names(rule, cfg, weights.__contains__)]
    for name in [*names, *tied_aliases(cfg)]:
        key = weights._resolve(name)
        if key is not None:
            used.add(key)
    derivable = [re.compile(p) for p in DERIVABLE_BUFFERS.get(cfg.family, ())]
    heads = [re.compile(p) for p in UNUSED_HEADS.get(cfg.family, ())]
    unmapped, dropped = [], []
    for key in weights:
        if key in used or any(p.fullmatch(key) for p in derivable):
            continue
        (dropped if any(p.fullmatch(key) for p in heads) else unmapped).append(key)
    return unmapped, dropped


def _names_list(names: list[str], shown: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_hf_tensors_mapped(path: str | Path, weights: HFWeights, cfg: ModelConfig) -> None:
    """Refuse (:class:`UnmappedTensorsError`, one line) a checkpoint whose tensors the mapping would drop."""
    unmapped, dropped = unmapped_hf_tensors(weights, cfg)
    if unmapped:
        raise UnmappedTensorsError(
            f"{path}: {len(unmapped)} Hugging Face tensor(s) that the {cfg.family} mapping of config.json does "
            f"not use: {_names_list(unmapped)}; expected none (the weights do not match config.json, e.g. "
            "biases it does not declare), refusing to drop them"
        )
    if dropped:
        logger.warning(
            "%s: dropping %d tensor(s) of heads the framework model has no use for: %s",
            path,
            len(dropped),
            _names_list(dropped),
        )


def read_hf_config(path: str | Path) -> Any:
    """The transformers config of a local model directory (never the network)."""
    import transformers

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p / 'config.json'}: missing; not a Hugging Face model directory")
    return transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)


def open_hf_model(
    path: str | Path,
    make_vocab_size_divisible_by: int = 128,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    **overrides: Any,
) -> tuple[ModelConfig, LazyState]:
    """``(framework config, lazy full tp=1 state dict)`` of a Hugging Face directory, read tensor by tensor.

    Every HF tensor is checked against the shape the config implies; a mismatch names the tensor. With
    ``strict`` (the default), a checkpoint holding tensors that the mapping would drop is refused up front
    (:func:`check_hf_tensors_mapped`), before any tensor is read.
    """
    cfg = config_from_hf(read_hf_config(path), make_vocab_size_divisible_by, **overrides)
    weights = HFWeights(path)
    if strict:
        check_hf_tensors_mapped(path, weights, cfg)
    expected = framework_shapes(cfg)
    rules = {r.ours: r for r in rules_for(cfg)}

    def load(name: str) -> torch.Tensor:
        rule = rules[name]
        t = rule_from_hf(rule, weights.__getitem__, cfg, weights.__contains__)
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"{path}: {' + '.join(rule.hf)} gives shape {tuple(t.shape)} for {name}, but config.json implies "
                f"{expected[name]}"
            )
        return t if dtype is None else t.to(dtype)

    return cfg, LazyState(list(rules), load)


@lru_cache(maxsize=8)
def _shapes(cfg_json: str) -> dict[str, tuple[int, ...]]:
    from megatron_ki.models import build_model

    cfg = ModelConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        model = build_model(cfg)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def framework_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the single-process (tp=1) model's tensors, from a model built on the meta device."""
    return _shapes(json.dumps(cfg.__dict__, sort_keys=True))


def hf_weight_plan(cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(framework name, HF name, HF shape)`` of every tensor a saved HF model holds (no tied aliases)."""
    shapes = framework_shapes(cfg)
    plan = []
    for rule in rules_for(cfg):
        meta = torch.empty(shapes[rule.ours], dtype=dtype, device="meta")
        for key, part in rule_to_hf(rule, meta, cfg):
            plan.append((rule.ours, key, tuple(part.shape)))
    return plan


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"10KiB"`` or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 1048576")
    return int(float(num) * units[unit])


_PlanEntry = tuple[str, str, tuple[int, ...]]  # (framework name, HF name, HF shape)


def _plan_shards(
    plan: list[_PlanEntry], item: int, max_shard_size: int
) -> tuple[list[str], list[list[_PlanEntry]]]:
    """Group the plan, in order, into shards of at most ``max_shard_size`` bytes, named like transformers."""
    shards: list[list[_PlanEntry]] = [[]]
    size = 0
    for entry in plan:
        n = math.prod(entry[2]) * item
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    return names, shards


def _safetensors_header(entries: list[_PlanEntry], dtype: torch.dtype, item: int) -> bytes:
    """A shard's safetensors header, padded to 8 bytes: computable from shapes alone, before any data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, key, shape in entries:
        n = math.prod(shape) * item
        header[key] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _write_shard(
    path: Path,
    entries: list[_PlanEntry],
    header: bytes,
    export: Callable[[str], list[tuple[str, torch.Tensor]]],
    pending: dict[str, torch.Tensor],
) -> None:
    """Stream one shard to disk, converting each framework tensor only when its first HF part is due.

    ``pending`` holds HF parts converted but not yet written (e.g. the rest of a split QKV), across shards.
    """
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for ours, key, shape in entries:
            if key not in pending:
                pending.update(export(ours))
            t = pending.pop(key)
            if tuple(t.shape) != shape:
                raise ValueError(f"{ours}: exported {key} has shape {tuple(t.shape)}, expected {shape}")
            if t.numel():  # the tensor's own buffer, no bytes copy
                fh.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
        fh.flush()
        os.fsync(fh.fileno())


def write_hf_weights(
    out_dir: str | Path,
    cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    max_shard_size: int = 5 * 10**9,
    on_tensor: Callable[[str], None] | None = None,
) -> list[str]:
    """Write ``state`` (framework tp=1 names, read lazily in order) as HF safetensors, tensor by tensor.

    The header of every shard is known before any data (shapes come from the config), so each tensor is
    converted, written and dropped in turn. Above ``max_shard_size`` the weights go to
    ``model-0000k-of-0000n.safetensors`` files with ``model.safetensors.index.json``, like transformers.
    Returns the files written.
    """
    out = Path(out_dir)
    plan = hf_weight_plan(cfg, dtype)
    item = torch.empty((), dtype=dtype).element_size()
    names, shards = _plan_shards(plan, item, max_shard_size)
    rules = {r.ours: r for r in rules_for(cfg)}

    def export(ours: str) -> list[tuple[str, torch.Tensor]]:
        parts = rule_to_hf(rules[ours], state[ours].to(dtype), cfg)
        if on_tensor is not None:
            on_tensor(ours)
        return parts

    pending: dict[str, torch.Tensor] = {}
    for fname, entries in zip(names, shards):
        _write_shard(out / fname, entries, _safetensors_header(entries, dtype, item), export, pending)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(math.prod(s) * item for _, _, s in plan)},
            "weight_map": {key: f for f, entries in zip(names, shards) for _, key, _ in entries},
        }
        (out / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
        names.append("model.safetensors.index.json")
    return names


def hf_config_for(
    cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any | None = None, eod_token_id: int | None = None
) -> Any:
    """config.json contents: the architecture, the dtype written, and the tokenizer's special ids.

    ``eod_token_id``, the document separator the model was trained with (recorded beside its data), becomes
    ``eos_token_id``, so ``generate()`` stops where the model learned that documents end, whatever the
    tokenizer calls its eos."""
    hf_cfg = config_to_hf(cfg)
    hf_cfg.architectures = [CAUSAL_ARCHITECTURE.get(cfg.family) or MASKED_ARCHITECTURE[cfg.family]]
    hf_cfg.dtype = str(dtype).removeprefix("torch.")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_cfg, key, None)
        if isinstance(value, int) and not 0 <= value < cfg.vocab_size:  # GPT-2's 50256 in a small vocabulary
            setattr(hf_cfg, key, None)
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None and not (key == "pad_token_id" and cfg.pad_token_id is not None):
                setattr(hf_cfg, key, int(value))
    if eod_token_id is not None and 0 <= eod_token_id < cfg.vocab_size:
        hf_cfg.eos_token_id = int(eod_token_id)
    return hf_cfg
