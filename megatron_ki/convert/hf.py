"""Hugging Face <-> framework mapping for GPT-2, Llama, BERT and RoBERTa (transformers 5.x names).

One mapping table per family relates the framework's *tp=1* state dict to the transformers one
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertForMaskedLM``, ``RobertaForMaskedLM``). Fused framework
tensors (QKV, SwiGLU gate/up) are the concatenation of several HF tensors along dim 0; GPT-2's Conv1D
weights are ``[in, out]`` and are transposed. Vocabulary-sized tensors are padded with zero rows to
``padded_vocab_size(1)`` on import and trimmed on export. Resharding to tp > 1 is a separate step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ki.config import ModelConfig


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
    cfg: ModelConfig, pairs: list[tuple[str, tuple[str, ...], bool]]
) -> list[tuple[str, tuple[str, ...], bool]]:
    """Add the ``.bias`` twin of every ``.weight`` linear rule when the model has linear biases."""
    out = []
    for ours, hf, transpose in pairs:
        out.append((ours, hf, transpose))
        if cfg.add_bias_linear and ours.endswith(".weight") and ".norm" not in ours and "_norm" not in ours:
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
        *_biased(cfg, [("layers.{i}.attention.qkv.weight", (f"{p}.attn.c_attn.weight",), True)]),
        *_biased(cfg, [("layers.{i}.attention.dense.weight", (f"{p}.attn.c_proj.weight",), True)]),
        *_norm("layers.{i}.mlp_norm", f"{p}.ln_2", cfg),
        *_biased(cfg, [("layers.{i}.mlp.fc1.weight", (f"{p}.mlp.c_fc.weight",), True)]),
        *_biased(cfg, [("layers.{i}.mlp.fc2.weight", (f"{p}.mlp.c_proj.weight",), True)]),
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
    p = "model.layers.{i}"
    attn = f"{p}.self_attn"
    layer = [
        *_norm("layers.{i}.attn_norm", f"{p}.input_layernorm", cfg),
        *_biased(
            cfg, [("layers.{i}.attention.qkv.weight", tuple(f"{attn}.{x}_proj.weight" for x in "qkv"), False)]
        ),
        *_biased(cfg, [("layers.{i}.attention.dense.weight", (f"{attn}.o_proj.weight",), False)]),
        *_norm("layers.{i}.mlp_norm", f"{p}.post_attention_layernorm", cfg),
        *_biased(
            cfg,
            [("layers.{i}.mlp.fc1.weight", (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"), False)],
        ),
        *_biased(cfg, [("layers.{i}.mlp.fc2.weight", (f"{p}.mlp.down_proj.weight",), False)]),
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
            cfg,
            [
                (
                    "layers.{i}.attention.qkv.weight",
                    tuple(f"{p}.attention.self.{x}.weight" for x in ("query", "key", "value")),
                    False,
                )
            ],
        ),
        *_biased(
            cfg, [("layers.{i}.attention.dense.weight", (f"{p}.attention.output.dense.weight",), False)]
        ),
        *_norm("layers.{i}.attn_norm", f"{p}.attention.output.LayerNorm", cfg),
        *_biased(cfg, [("layers.{i}.mlp.fc1.weight", (f"{p}.intermediate.dense.weight",), False)]),
        *_biased(cfg, [("layers.{i}.mlp.fc2.weight", (f"{p}.output.dense.weight",), False)]),
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


MAPPINGS = {"gpt2": gpt2_rules, "llama": llama_rules, "bert": bert_rules, "roberta": roberta_rules}

# HF keys that alias another tensor (tied weights); written on export, not read on import
_TIED_ALIASES = {
    "gpt2": {"lm_head.weight": "embedding.word_embeddings.weight"},
    "llama": {"lm_head.weight": "embedding.word_embeddings.weight"},
    "bert": {
        "cls.predictions.decoder.weight": "embedding.word_embeddings.weight",
        "cls.predictions.decoder.bias": "head.bias",
    },
    "roberta": {
        "lm_head.decoder.weight": "embedding.word_embeddings.weight",
        "lm_head.decoder.bias": "head.bias",
    },
}


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
        return [cfg.hidden_size, kv, kv]
    return [cfg.ffn_size, cfg.ffn_size]


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Framework tp=1 state dict from a transformers one (vocab tensors zero-padded to the padded vocab)."""
    out: dict[str, torch.Tensor] = {}
    vp = cfg.padded_vocab_size(1)
    for rule in rules_for(cfg):
        missing = [k for k in rule.hf if k not in hf_state]
        if missing:
            if cfg.family in ("bert", "roberta") and rule.ours == "head.bias":
                alias = next(k for k, v in _TIED_ALIASES[cfg.family].items() if v == "head.bias")
                if alias in hf_state:
                    missing, rule = [], dataclasses.replace(rule, hf=(alias,))
            if missing:
                raise KeyError(f"Hugging Face state dict lacks {missing} (needed for {rule.ours})")
        parts = [hf_state[k].t() if rule.transpose else hf_state[k] for k in rule.hf]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if rule.vocab and t.shape[0] != vp:
            if t.shape[0] > vp:
                raise ValueError(f"{rule.hf[0]} has {t.shape[0]} rows, more than the padded vocabulary {vp}")
            t = torch.cat([t, t.new_zeros((vp - t.shape[0], *t.shape[1:]))], dim=0)
        out[rule.ours] = t.contiguous().clone()
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers state dict (tied aliases included) from a framework tp=1 state dict."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules_for(cfg):
        if rule.ours not in state:
            raise KeyError(f"framework state dict lacks {rule.ours} (needed for {rule.hf})")
        t = state[rule.ours]
        if rule.vocab:
            t = t[: cfg.vocab_size]
        sizes = _split_sizes(cfg, rule)
        parts = list(torch.split(t, sizes, dim=0)) if sizes else [t]
        for key, part in zip(rule.hf, parts):
            out[key] = (part.t() if rule.transpose else part).contiguous().clone()
    if cfg.tie_word_embeddings:
        for alias, ours in _TIED_ALIASES[cfg.family].items():
            out[alias] = out[next(r.hf[0] for r in rules_for(cfg) if r.ours == ours)]
    elif cfg.family in ("bert", "roberta"):
        alias = next(k for k, v in _TIED_ALIASES[cfg.family].items() if v == "head.bias")
        out[alias] = out[next(r.hf[0] for r in rules_for(cfg) if r.ours == "head.bias")]
    return out


# -------------------------------------------------------------------------------------------- configs
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"Hugging Face config: {what}")


def config_from_hf(hf_config: Any, make_vocab_size_divisible_by: int = 128, **overrides: Any) -> ModelConfig:
    """ModelConfig equivalent to a transformers GPT2/Llama/Bert/Roberta config (``overrides`` win)."""
    mt = getattr(hf_config, "model_type", None)
    c = hf_config
    if mt == "gpt2":
        _require(
            c.activation_function in _ACT_FROM_HF,
            f"activation_function {c.activation_function!r} unsupported",
        )
        _require(
            not getattr(c, "scale_attn_by_inverse_layer_idx", False),
            "scale_attn_by_inverse_layer_idx unsupported",
        )
        _require(getattr(c, "scale_attn_weights", True), "scale_attn_weights=False unsupported")
        kw = dict(
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
    elif mt == "llama":
        rope = getattr(c, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        _require(rope_type == "default", f"rope_type {rope_type!r} unsupported (only 'default')")
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        _require(
            head_dim * c.num_attention_heads == c.hidden_size, f"head_dim {head_dim} x heads != hidden_size"
        )
        _require(c.hidden_act == "silu", f"hidden_act {c.hidden_act!r} unsupported (SwiGLU needs 'silu')")
        _require(c.attention_bias == c.mlp_bias, "attention_bias and mlp_bias must agree")
        kw = dict(
            family="llama",
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            ffn_hidden_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings,
            position_embedding="rope",
            rope_theta=float(theta),
            normalization="rmsnorm",
            norm_eps=c.rms_norm_eps,
            pre_norm=True,
            activation="swiglu",
            add_bias_linear=bool(c.attention_bias),
            tie_word_embeddings=bool(c.tie_word_embeddings),
            attention_dropout=float(c.attention_dropout),
            init_method_std=c.initializer_range,
        )
    elif mt in ("bert", "roberta"):
        _require(c.hidden_act in _ACT_FROM_HF, f"hidden_act {c.hidden_act!r} unsupported")
        pet = getattr(c, "position_embedding_type", "absolute") or "absolute"
        _require(pet == "absolute", f"position_embedding_type {pet!r} unsupported")
        offset = c.pad_token_id + 1 if mt == "roberta" else 0
        kw = dict(
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
            position_offset=offset,
            embedding_norm=True,
            hidden_dropout=c.hidden_dropout_prob,
            attention_dropout=c.attention_probs_dropout_prob,
            init_method_std=c.initializer_range,
        )
    else:
        raise ValueError(
            f"Hugging Face config: model_type {mt!r} unsupported; expected gpt2, llama, bert or roberta"
        )
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
    if cfg.family == "llama":
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_bias=cfg.add_bias_linear,
            mlp_bias=cfg.add_bias_linear,
            attention_dropout=cfg.attention_dropout,
            tie_word_embeddings=cfg.tie_word_embeddings,
            initializer_range=cfg.init_method_std,
        )
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
            max_position_embeddings=cfg.max_position_embeddings + cfg.position_offset,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps,
            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            initializer_range=cfg.init_method_std,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    raise ValueError(f"model.family: no Hugging Face config for {cfg.family!r}")


def load_hf_model(hf_model: Any, make_vocab_size_divisible_by: int = 128, seed: int = 0, **overrides: Any):
    """A single-process framework model holding a transformers model's weights: ``(model, cfg)``."""
    from megatron_ki.models import build_model

    cfg = config_from_hf(hf_model.config, make_vocab_size_divisible_by, **overrides)
    model = build_model(cfg, seed=seed)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in from_hf_state_dict(hf_model.state_dict(), cfg).items()}
    model.load_state_dict(state, strict=True)
    return model, cfg
