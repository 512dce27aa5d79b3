"""The configuration's schema: one dataclass per concern, validated where it is defined.

A run's configuration is a :class:`Config` made of groups (``model``, ``parallel``, ``ki``, ``data``,
``optim``, ``train``, ``checkpoint``, ``logging``). Each group checks its own fields in ``__post_init__``;
:meth:`Config.validate` checks them against each other and the world size. A bad value raises
:class:`ConfigError` naming the key. Each field's docstring (the string literal under it) is its documentation
(``--help`` reads them). Reading YAML and command lines is :mod:`megatron_ki.config.loader`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .coerce import build
from .errors import ConfigError, check

TEACHER_DTYPE_FOR_PRECISION = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture of one transformer (student or teacher). Switches cover GPT-2, Llama (Qwen2, Qwen3,
    Mistral), BERT and RoBERTa."""

    family: Literal["gpt2", "llama", "qwen2", "qwen3", "mistral", "bert", "roberta"] = "gpt2"
    """Model family; sets the task (causal LM for gpt2 and the Llama-like ones, masked LM for bert/roberta) and
    the Hugging Face mapping (qwen2, qwen3 and mistral are Llama's with the switches below)."""
    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention; None means equal to num_attention_heads (MHA)."""
    kv_channels: int | None = None
    """Width of one attention head (Megatron's --kv-channels, transformers' head_dim) where it is not
    hidden_size / num_attention_heads (Qwen3-0.6B/4B, Mistral Nemo); None means hidden_size / heads."""
    ffn_hidden_size: int | None = None
    """Inner width of the MLP; None means 4 x hidden_size."""
    vocab_size: int = 256
    """Tokenizer vocabulary size (before padding for tensor parallelism)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding to a multiple of this times the tensor-parallel size (Megatron's rule)."""
    max_position_embeddings: int = 128
    """Longest sequence the position embeddings (learned) or RoPE cache cover."""
    position_embedding: Literal["learned", "rope", "none"] = "learned"
    """Learned absolute positions (GPT-2, BERT), rotary embeddings (Llama) or none."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Literal["none", "linear", "dynamic", "llama3"] = "none"
    """RoPE frequency scaling, as transformers' rope_type: none (plain RoPE), linear (frequencies / factor),
    dynamic (NTK: a larger base once positions pass max_position_embeddings) or llama3 (Llama 3.1+)."""
    rope_scaling_factor: float = 1.0
    """``factor`` of linear, dynamic and llama3 RoPE scaling."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE scaling: wavelengths above original_max_position_embeddings / this are divided by factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE scaling: wavelengths below original_max_position_embeddings / this are kept."""
    rope_original_max_position_embeddings: int | None = None
    """llama3 RoPE scaling: the pre-training context (8192 for Llama 3.1); None means max_position_embeddings."""
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (GPT-2, BERT) or RMSNorm (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    pre_norm: bool = True
    """Pre-LN blocks with a final norm (GPT-2, Llama); False gives post-LN blocks (BERT, RoBERTa)."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    """MLP activation: exact GELU (BERT), tanh GELU (GPT-2 'gelu_new') or SwiGLU (Llama)."""
    add_bias_linear: bool = True
    """Biases in attention and MLP linears (False for Llama)."""
    add_qkv_bias: bool | None = None
    """Bias of the query/key/value projection alone (Megatron's --add-qkv-bias: Qwen2 has it without any other
    linear bias); None follows add_bias_linear."""
    add_mlp_bias: bool | None = None
    """Biases of the MLP linears (Llama's mlp_bias, apart from attention_bias); None follows add_bias_linear."""
    qk_norm: bool = False
    """RMSNorm of every query and key head (one head_dim weight each, shared by the heads) before RoPE
    (Qwen3)."""
    sliding_window: int | None = None
    """Mistral's attention window. Only sequences that fit in it are supported (the window then never cuts
    anything): data.seq_length must be at most this. None: no window."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output projection."""
    type_vocab_size: int = 0
    """Token-type (segment) embeddings: 2 for BERT, 1 for RoBERTa, 0 for none."""
    pad_token_id: int | None = None
    """Padding id, the tokenizer's. RoBERTa (learned positions) numbers positions as transformers does: real
    tokens from pad_token_id + 1 on, padding at pad_token_id; required there."""
    position_offset: int | None = None
    """Deprecated, derived: RoBERTa's first position id is pad_token_id + 1 (transformers' padding_idx + 1)
    and its position table has max_position_embeddings + pad_token_id + 1 rows; 0 for the other families.
    A value given (older configs and checkpoints) must agree, and is then dropped (read as null)."""
    embedding_norm: bool = False
    """LayerNorm right after the embeddings (BERT, RoBERTa)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches and embeddings."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    attention_backend: Literal["sdpa", "fused_softmax", "eager"] = "sdpa"
    """Attention implementation: torch SDPA, the fused scaled-masked-softmax kernel, or plain PyTorch math."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of parameters and activations; softmax and loss statistics stay in fp32."""
    recompute_granularity: Literal["none", "full"] = "none"
    """Activation recomputation while training: full keeps only each block's input and runs the block again in
    backward (Megatron's --recompute-granularity full, one layer per chunk), for one extra forward of the
    blocks; dropout masks, also of the tensor-parallel region, are replayed exactly."""

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
        ):
            check(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        check(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_attention_heads={self.num_attention_heads}, got {self.hidden_size}",
        )
        kv = self.kv_heads
        check(
            kv > 0 and self.num_attention_heads % kv == 0,
            "model.num_key_value_heads",
            f"must divide model.num_attention_heads={self.num_attention_heads}, got {kv}",
        )
        check(self.make_vocab_size_divisible_by > 0, "model.make_vocab_size_divisible_by", "must be positive")
        check(0.0 <= self.hidden_dropout < 1.0, "model.hidden_dropout", "must be in [0, 1)")
        check(0.0 <= self.attention_dropout < 1.0, "model.attention_dropout", "must be in [0, 1)")
        if self.padding_positions:
            check(
                self.pad_token_id is not None and self.pad_token_id >= 0,
                "model.pad_token_id",
                f"is required for family roberta (learned positions start at pad_token_id + 1, as in "
                f"transformers): set the tokenizer's padding id, got {self.pad_token_id}",
            )
        self._check_llama_switches()
        if self.position_offset is not None:
            self._check_legacy_position_offset()
            self.position_offset = None  # derived: a stale copy must not outlive a change of pad_token_id

    def _check_llama_switches(self) -> None:
        """RoPE scaling, q/k norms and windows exist for RoPE/RMSNorm models only; values in range."""
        if self.rope_scaling != "none":
            check(
                self.position_embedding == "rope", "model.rope_scaling", "needs model.position_embedding rope"
            )
            check(self.rope_scaling_factor > 0, "model.rope_scaling_factor", "must be positive")
        if self.rope_scaling == "llama3":
            check(
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                "model.rope_low_freq_factor",
                f"must be positive and below model.rope_high_freq_factor={self.rope_high_freq_factor}, got "
                f"{self.rope_low_freq_factor}",
            )
        if self.qk_norm:
            check(self.normalization == "rmsnorm", "model.qk_norm", "needs model.normalization rmsnorm")
        if self.sliding_window is not None:
            check(
                self.sliding_window > 0,
                "model.sliding_window",
                f"must be positive, got {self.sliding_window}",
            )

    def _check_legacy_position_offset(self) -> None:
        given, derived = self.position_offset, self.position_id_offset
        if given == derived:
            return
        if not self.padding_positions:
            raise ConfigError(
                "model.position_offset",
                f"must be 0 or omitted for family {self.family} with {self.position_embedding} positions, got "
                f"{given}: only roberta numbers positions from model.pad_token_id + 1",
            )
        pad = self.pad_token_id
        hint = ""
        same_table = self.max_position_embeddings + given - derived
        if given > 0 and same_table > 0:
            hint = (
                f"; a model trained with position_offset {given} and this padding id keeps its "
                f"{self.max_position_embeddings + given}-row position table with model.max_position_embeddings "
                f"{same_table}"
            )
        raise ConfigError(
            "model.position_offset",
            f"{given} disagrees with model.pad_token_id={pad}: RoBERTa positions start at pad_token_id + 1 = "
            f"{derived} (transformers' rule), so the offset is derived from the padding id; remove "
            f"model.position_offset{hint}",
        )

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """Width of all query heads together: the QKV projection's q part, the output projection's input."""
        return self.num_attention_heads * self.head_dim

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def qkv_bias(self) -> bool:
        """Whether the fused query/key/value projection has a bias."""
        return self.add_bias_linear if self.add_qkv_bias is None else self.add_qkv_bias

    @property
    def mlp_bias(self) -> bool:
        """Whether the MLP linears have biases."""
        return self.add_bias_linear if self.add_mlp_bias is None else self.add_mlp_bias

    @property
    def causal(self) -> bool:
        """Causal (GPT-2, Llama and its kin) or bidirectional (BERT, RoBERTa) attention."""
        return self.family not in ("bert", "roberta")

    @property
    def padding_positions(self) -> bool:
        """RoBERTa's learned positions: real tokens count from pad_token_id + 1, padding sits at pad_token_id."""
        return self.family == "roberta" and self.position_embedding == "learned"

    @property
    def position_id_offset(self) -> int:
        """First position id of a real token: pad_token_id + 1 for RoBERTa (transformers' padding_idx + 1), else
        0. A sample of s tokens uses ids up to s - 1 + this."""
        return self.pad_token_id + 1 if self.padding_positions else 0

    def positions_fit(self, seq_length: int) -> bool:
        """Whether every position id of a ``seq_length``-token sample (up to seq_length - 1 + the offset) has a
        row in the position table."""
        return seq_length - 1 + self.position_id_offset < self.position_table_size

    def pads_like(self, student: ModelConfig) -> bool:
        """Whether this model, used as ``student``'s teacher, numbers RoBERTa positions from the student's
        padding id (only a learned RoBERTa table depends on it; an unknown student padding id is no conflict)."""
        return not self.padding_positions or student.pad_token_id in (None, self.pad_token_id)

    @property
    def position_table_size(self) -> int:
        """Rows of the learned position table: max_position_embeddings + position_id_offset (transformers'
        RobertaConfig.max_position_embeddings, e.g. 514 for roberta-base)."""
        return self.max_position_embeddings + self.position_id_offset

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, tp: int = 1) -> int:
        """Parameter count (padded vocabulary at ``tp``), used for FLOP estimates and size checks."""
        h, f, v = self.hidden_size, self.ffn_size, self.padded_vocab_size(tp)
        kv, q = self.kv_heads * self.head_dim, self.attention_width
        b, bq, bm = (int(x) for x in (self.add_bias_linear, self.qkv_bias, self.mlp_bias))
        attn = (
            h * (q + 2 * kv) + bq * (q + 2 * kv) + q * h + b * h + (2 * self.head_dim if self.qk_norm else 0)
        )
        fc1 = 2 * f if self.activation == "swiglu" else f  # SwiGLU: gate and up
        mlp = (fc1 + f) * h + bm * (fc1 + h)
        per_layer = attn + mlp + 2 * (2 if self.normalization == "layernorm" else 1) * h
        norm = (2 if self.normalization == "layernorm" else 1) * h  # one norm's weight (+ bias)
        positions = self.position_table_size
        emb = v * h + (positions * h if self.position_embedding == "learned" else 0)
        emb += self.type_vocab_size * h + (norm if self.embedding_norm else 0)
        head = (norm if self.pre_norm else 0) + (0 if self.tie_word_embeddings else v * h)
        if not self.causal:  # MLM head: dense + norm + output bias
            head += h * h + h + norm + v
        return self.num_layers * per_layer + emb + head


# ------------------------------------------------------------------------------------------ parallel
@dataclass
class ParallelConfig:
    """How the world is split: tensor x pipeline x data parallel (data = world / (tp x pp))."""

    tensor_parallel: int = 1
    """Tensor-parallel size: heads, FFN and vocabulary are split over this many ranks."""
    pipeline_parallel: int = 1
    """Pipeline stages; the model's layers are divided among them."""
    pipeline_partition: Literal["parameters", "uniform", "compute"] = "parameters"
    """How layers are assigned to pipeline stages: DeepSpeed's balance of parameter or layer counts, or
    compute: balance of each layer's FLOPs (forward + backward; a KI teacher's layers beside it, forward only;
    the head with the loss over the vocabulary), so the last stage is not the slowest."""
    sequence_parallel: bool = False
    """Megatron-LM's sequence parallelism, for the student and the teacher: outside the tensor-parallel regions
    (norms, dropout, residual adds) each of the tensor_parallel ranks holds 1/tp of the sequence (all-gather
    before the column-parallel layers, reduce-scatter after the row-parallel ones: the same traffic as without
    it), so those activations take 1/tp of the memory. Between pipeline stages the sequence chunk travels.
    data.seq_length must be divisible by tensor_parallel; no effect at tensor_parallel 1."""

    def __post_init__(self) -> None:
        check(
            self.tensor_parallel >= 1, "parallel.tensor_parallel", f"must be >= 1, got {self.tensor_parallel}"
        )
        check(
            self.pipeline_parallel >= 1,
            "parallel.pipeline_parallel",
            f"must be >= 1, got {self.pipeline_parallel}",
        )


# ------------------------------------------------------------------------------------------------ ki
@dataclass
class KIConfig:
    """Knowledge Inheritance: the frozen teacher and the weight a_t of its distillation loss."""

    enabled: bool = False
    """Train with a teacher; False is plain pre-training from scratch."""
    teacher_path: str | None = None
    """Framework checkpoint directory of the teacher (any tp/pp), or ``hf:/path`` for a Hugging Face model."""
    teacher: ModelConfig | None = None
    """Teacher architecture; None reads it from the teacher checkpoint's metadata."""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the frozen teacher is stored and run in; auto follows train.precision (bf16 -> bfloat16, fp16 ->
    float16, fp32 -> float32), so fp32 runs on CPUs without bf16 units keep the teacher on the fast path."""
    divergence: Literal["forward_kl", "reverse_kl", "cross_entropy"] = "forward_kl"
    """D(teacher || student): forward KL (the paper's), reverse KL, or cross-entropy to the teacher."""
    temperature: float = 2.0
    """Softmax temperature tau of both distributions; the KD term is scaled by tau^2."""
    schedule: Literal["linear", "step", "constant", "wsd"] = "linear"
    """How a_t evolves: linear decay to 0 over decay_steps, step (a_0 then 0), constant, or following the LR."""
    alpha0: float = 1.0
    """a_0, the initial weight of the KD loss."""
    decay_steps: int = 1000
    """T_ki: steps after which a_t is 0 and the teacher is released (linear and step schedules)."""
    teacher_targets: list[str] = field(default_factory=list)
    """Offline teacher targets instead of a teacher (``tools/precompute_teacher.py``): one targets path per
    dataset of ``data.data_path``, in its order. The KD term is then over the stored top-K ids plus a tail
    bucket, at the temperature they were computed at; no teacher runs (causal models)."""

    def __post_init__(self) -> None:
        if isinstance(self.teacher, dict):
            self.teacher = build(ModelConfig, self.teacher, "ki.teacher")
        self.teacher_targets = [str(p) for p in self.teacher_targets]
        check(self.temperature > 0, "ki.temperature", f"must be positive, got {self.temperature}")
        check(0.0 <= self.alpha0 <= 1.0, "ki.alpha0", f"must be in [0, 1], got {self.alpha0}")
        check(self.decay_steps >= 0, "ki.decay_steps", f"must be >= 0, got {self.decay_steps}")
        if not self.enabled:
            return
        check(
            not (self.teacher_targets and (self.teacher_path or self.teacher is not None)),
            "ki.teacher_targets",
            "replaces the teacher: give either ki.teacher_targets or ki.teacher_path / ki.teacher, not both",
        )
        check(
            self.teacher_path is not None or self.teacher is not None or bool(self.teacher_targets),
            "ki.teacher_path",
            "is required when ki.enabled is true (or ki.teacher_targets for precomputed targets, or ki.teacher for "
            "a randomly initialised teacher)",
        )

    @property
    def offline(self) -> bool:
        """KI from precomputed targets: no teacher model in the run."""
        return self.enabled and bool(self.teacher_targets)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into samples."""

    data_path: list[str | float] = field(default_factory=list)
    """Megatron form: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` (weights normalised); on the
    command line ``--data.data_path 0.3 prefixA 0.7 prefixB``."""
    split: str = "969,30,1"
    """train/valid/test proportions of each dataset's documents."""
    seq_length: int = 128
    """Tokens per sample."""
    tokenizer_type: Literal["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "none"] = (
        "none"
    )
    """Tokenizer kind; must be the same for student and teacher."""
    tokenizer_model: str | None = None
    """Sentencepiece model file or Hugging Face tokenizer directory."""
    mask_prob: float = 0.15
    """MLM: fraction of tokens selected for prediction (80% <mask>, 10% random, 10% kept)."""
    whole_word_masking: bool = False
    """MLM: mask all pieces of a word together."""
    mask_seed: int | None = None
    """MLM: None draws a new mask for every sample (RoBERTa's dynamic masking, seeded by data.seed); an integer
    makes the mask static, a function of this seed and each token's position in the .bin (BERT-style, the same
    in every epoch): what offline targets of a masked-LM teacher need (data/static_mask.py)."""
    seed: int = 1234
    """Seed of shuffling and masking."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cache_dir: str | None = None
    """Where sample/shuffle indices are cached; None puts them beside the data."""
    accept_prefix_tokenizer: bool = False
    """Accept data, a teacher or offline targets made with a tokenizer whose pieces are the first pieces of
    ``tokenizer_model``'s, with the same special ids: the student's tokenizer appended pieces to theirs, so
    their ids keep their meaning. Any other difference of tokenizer content (recorded as a fingerprint in
    ``.stats.json``, checkpoints and targets) is refused before any process starts work."""

    def __post_init__(self) -> None:
        check(self.seq_length > 0, "data.seq_length", f"must be positive, got {self.seq_length}")
        check(0.0 < self.mask_prob < 1.0, "data.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        check(
            self.mask_seed is None or not self.whole_word_masking,
            "data.whole_word_masking",
            "static masks (data.mask_seed) mask tokens, not whole words: set one of the two",
        )
        parse_split(self.split)
        self.data_path = [str(p) for p in self.data_path]
        if self.data_path:  # empty: no data yet (the entry point requires it, a model-only config does not)
            parse_data_path(self.data_path)


def parse_data_path(data_path: list[str] | str) -> tuple[list[float], list[str]]:
    """``data.data_path`` (Megatron's ``[prefix]`` or ``[w1, p1, w2, p2, ...]``, or the same words in one
    string) -> (weights normalised to sum 1, prefixes). The one reading of it, by :class:`DataConfig` and by
    the data pipeline (:mod:`megatron_ki.data.blending`)."""
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    check(bool(items), "data.data_path", "no dataset given: expected a prefix or pairs of 'weight prefix'")
    if len(items) == 1:
        return [1.0], items
    check(
        len(items) % 2 == 0,
        "data.data_path",
        f"expected one prefix or pairs of 'weight prefix', got an odd number of entries ({len(items)}): {items}",
    )
    weights, prefixes = [], []
    for i in range(0, len(items), 2):
        try:
            weight = float(items[i])
        except ValueError:
            raise ConfigError("data.data_path", f"entry {i} should be a weight, got {items[i]!r}") from None
        check(
            weight >= 0 and math.isfinite(weight),
            "data.data_path",
            f"weight {items[i]} of {items[i + 1]} (entry {i}) must be a finite number >= 0",
        )
        weights.append(weight)
        prefixes.append(items[i + 1])
    total = sum(weights)
    check(total > 0, "data.data_path", f"the weights sum to 0; at least one must be positive, got {items}")
    return [w / total for w in weights], prefixes


def parse_split(split: str) -> list[float]:
    """``data.split`` (``'969,30,1'`` or ``'80/10/10'``, up to three proportions) -> the train, valid and test
    fractions (summing to 1; missing ones 0). The one reading of it, by :class:`DataConfig` and by the data
    pipeline (:func:`megatron_ki.data.blending.split_ranges`)."""
    try:
        values = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(
            "data.split", f"expected comma-separated numbers like '969,30,1', got {split!r}"
        ) from None
    check(
        len(values) <= 3 and all(v >= 0 and math.isfinite(v) for v in values) and sum(values) > 0,
        "data.split",
        f"expected up to three finite non-negative numbers with a positive sum, got {split!r}",
    )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


# --------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (the paper's: 10% warmup then linear decay)."""

    lr: float = 5e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.98
    """Adam beta2."""
    adam_eps: float = 1e-6
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold; 0 disables."""
    lr_warmup_fraction: float = 0.1
    """Fraction of train.train_steps spent warming up linearly."""
    lr_decay_style: Literal["linear", "cosine", "constant", "inverse_sqrt"] = "linear"
    """Decay after warmup."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr], got {self.min_lr}")
        check(0 <= self.lr_warmup_fraction <= 1, "optim.lr_warmup_fraction", "must be in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, f"optim.{name}", "must be in [0, 1)")
        check(self.adam_eps > 0, "optim.adam_eps", "must be positive")
        check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0")


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """Batch sizes, length of training, precision and evaluation cadence."""

    micro_batch_size: int = 2
    """Samples per data-parallel rank per forward/backward."""
    global_batch_size: int = 4
    """Samples per optimizer step over all data-parallel ranks (micro x dp x gradient accumulation)."""
    train_steps: int = 100
    """Optimizer steps to run (derived from train_tokens when that is set)."""
    train_tokens: int | None = None
    """Train for this many tokens instead: train_steps = ceil(tokens / (global_batch_size x seq_length))."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16/fp16 keep fp32 master weights in the optimizer."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    eval_interval: int = 50
    """Evaluate on the validation split every this many steps (0: only at the end)."""
    eval_iters: int = 10
    """Validation global batches per evaluation."""
    eval_at_start: bool = False
    """Evaluate once before the first step (logged at step 0): the loss a run starts from, e.g. after
    ``checkpoint.init_from`` a grown model's, which should equal its teacher's. Not on resume."""
    eval_samples: Literal["fixed", "continuing"] = "fixed"
    """fixed: every evaluation reads the same samples, the first eval_iters global batches of the valid split
    in order (the same set at every data-parallel size), so a curve moves only because the model changed;
    continuing: Megatron's iterator, each evaluation reads the next eval_iters batches."""
    seed: int = 1234
    """Seed of parameter initialisation and dropout."""
    max_consecutive_skips: int = 10
    """Abort after this many consecutive steps with a non-finite loss or gradient."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON whose entries override the generated config."""
    collective_timeout_s: int = 600
    """Seconds without progress after which the job ends instead of hanging: a step watchdog on every rank
    names the rank that stopped answering and exits non-zero; collectives themselves time out a little later."""
    exit_signal_handler: bool = True
    """SIGTERM/SIGINT to the launcher or any rank: every rank finishes its step, saves a checkpoint (when
    checkpoint.save is set) and exits with code 75, so a scheduler can requeue (Megatron-LM's
    --exit-signal-handler). False: the signals end the processes at once."""
    exit_duration_mins: float | None = None
    """Save and exit with code 75 after this many minutes of wall-clock time since start-up, before a
    scheduler's time limit (Megatron-LM's --exit-duration-in-mins)."""
    exit_interval: int = 0
    """Save and exit with code 75 after a step that is a multiple of this (0: never), to cut a long run into
    scheduler-sized pieces (Megatron-LM's --exit-interval)."""
    fused_head_loss: bool = True
    """Compute the output head(s) and the loss (LM, and KI's KD term) together in chunks of
    fused_head_chunk_tokens loss positions, so no [tokens, vocab/tp] logits exist (ki/fused_head.py), at pp = 1 and
    on the last pipeline stage. The same loss and gradients up to rounding; false: the logits, then the loss.
    Runs that read offline teacher targets (ki.teacher_targets) project only the loss positions' rows (all of
    them at once, not chunked), then the sparse loss; false: every position's logits."""
    fused_head_chunk_tokens: int = 512
    """Loss positions per chunk of the fused head: its extra memory grows with chunk x vocab/tp, not with the
    number of tokens."""

    def __post_init__(self) -> None:
        check(
            self.micro_batch_size > 0,
            "train.micro_batch_size",
            f"must be positive, got {self.micro_batch_size}",
        )
        check(
            self.global_batch_size > 0,
            "train.global_batch_size",
            f"must be positive, got {self.global_batch_size}",
        )
        check(self.train_steps >= 0, "train.train_steps", "must be >= 0")
        check(self.zero_stage in (0, 1, 2), "train.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        check(self.eval_interval >= 0, "train.eval_interval", "must be >= 0")
        check(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive")
        check(
            self.fused_head_chunk_tokens > 0,
            "train.fused_head_chunk_tokens",
            f"must be positive, got {self.fused_head_chunk_tokens}",
        )
        check(
            self.exit_duration_mins is None or self.exit_duration_mins > 0,
            "train.exit_duration_mins",
            f"must be positive, got {self.exit_duration_mins}",
        )
        check(self.exit_interval >= 0, "train.exit_interval", f"must be >= 0, got {self.exit_interval}")


# ---------------------------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointConfig:
    """Where checkpoints go and come from."""

    save: str | None = None
    """Directory to save checkpoints in; None disables saving."""
    load: str | None = None
    """Directory to resume from: its newest complete tag (normally the one ``latest`` names; an incomplete tag is
    skipped for the next older one). A missing or empty directory is an error unless ``load_if_exists`` is set."""
    load_if_exists: bool = False
    """For requeue scripts that pass the same directory to save and load: a missing or empty ``load``
    directory starts from scratch with one log line instead of failing."""
    load_universal: bool = False
    """``load`` is a DeepSpeed universal checkpoint (the parent of ``ds_to_universal``'s output folder, whose
    ``latest_universal`` names the tag): resume its weights and optimizer state at this run's tensor and data
    parallel sizes (DeepSpeed's ``checkpoint.load_universal``; needs ``train.zero_stage`` 1 or 2)."""
    init_from: str | None = None
    """Start from these weights only: a framework checkpoint at any tp/pp (e.g. tools/grow_checkpoint.py's
    output, or a converted Hugging Face model) or ``hf:DIR``; step 0, a fresh optimizer and the configured
    warm-up. The model must have the same shape (a mismatch is refused naming each field). Ignored when
    ``load`` resumes a checkpoint (a requeued job keeps its progress)."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted after a successful save."""
    lock_stale_minutes: float = 10.0
    """A job holds ``save/.lock`` (host, pid, job id, start time) while it runs and touches it every minute;
    another job with the same ``save`` is refused. A lock whose pid is gone on this host, or that nobody
    touched for this many minutes (a holder on another host), was left by a dead job and is taken over."""

    def __post_init__(self) -> None:
        check(self.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")
        check(
            self.lock_stale_minutes > 1,
            "checkpoint.lock_stale_minutes",
            f"must be more than the 1 minute between touches of the lock, got {self.lock_stale_minutes}",
        )
        check(
            not (self.init_from and self.load_universal),
            "checkpoint.init_from",
            "cannot be combined with checkpoint.load_universal (a universal checkpoint resumes a run)",
        )


# ------------------------------------------------------------------------------------------- logging
@dataclass
class LoggingConfig:
    """Metrics and logs."""

    run_dir: str = "runs/default"
    """Directory of metrics.jsonl, TensorBoard events and the generated DeepSpeed config."""
    log_interval: int = 1
    """Write metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    stage_timers: bool = False
    """Log each pipeline stage's time per kind of work every step (``stage{s}_forward_pass_ms``,
    ``..._recv_activation_ms``, ...; training/deepspeed_compat.py:StageTimer): where a pipelined step's time goes.
    A collective per step and, on GPUs, a synchronise per timed span: a diagnostic."""

    def __post_init__(self) -> None:
        check(self.log_interval >= 1, "logging.log_interval", f"must be >= 1, got {self.log_interval}")


# ------------------------------------------------------------------------------------------ the whole
@dataclass
class Config:
    """A whole run. Groups are validated on their own; :meth:`validate` checks them against each other."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student (or the only) model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout."""
    ki: KIConfig = field(default_factory=KIConfig)
    """Knowledge Inheritance."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    def __post_init__(self) -> None:
        if self.ki.teacher_dtype == "auto":
            self.ki.teacher_dtype = TEACHER_DTYPE_FOR_PRECISION[self.train.precision]
        if self.train.train_tokens is not None:
            check(
                self.train.train_tokens > 0,
                "train.train_tokens",
                f"must be positive, got {self.train.train_tokens}",
            )
            per_step = self.train.global_batch_size * self.data.seq_length
            self.train.train_steps = -(-self.train.train_tokens // per_step)

    def validate(self, world_size: int) -> None:
        """Cross-group checks for a run over ``world_size`` ranks; call before creating process groups."""
        tp, pp = self.parallel.tensor_parallel, self.parallel.pipeline_parallel
        check(
            world_size % (tp * pp) == 0,
            "parallel.tensor_parallel",
            f"tensor_parallel x pipeline_parallel = {tp} x {pp} must divide the world size {world_size}",
        )
        dp = world_size // (tp * pp)
        check_split(self.model, tp, pp)
        per_step = self.train.micro_batch_size * dp
        check(
            self.train.global_batch_size % per_step == 0,
            "train.global_batch_size",
            f"{self.train.global_batch_size} is not divisible by train.micro_batch_size x data-parallel size = "
            f"{self.train.micro_batch_size} x {dp} = {per_step}",
        )
        check_positions(self.model, self.data.seq_length)
        check(
            not self.parallel.sequence_parallel or self.data.seq_length % tp == 0,
            "parallel.sequence_parallel",
            f"data.seq_length {self.data.seq_length} is not divisible by parallel.tensor_parallel {tp}: each "
            "tensor-parallel rank holds an equal chunk of the sequence",
        )
        if self.ki.enabled and self.ki.teacher is not None:
            check_teacher(self.model, self.ki.teacher, tp, self.data.seq_length, pp)
        if self.ki.offline:
            check_offline_targets(self)

    def gradient_accumulation_steps(self, world_size: int) -> int:
        dp = world_size // (self.parallel.tensor_parallel * self.parallel.pipeline_parallel)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_offline_targets(cfg: Config) -> None:
    """``ki.teacher_targets`` fits the run: one path per dataset; a masked-LM student masks statically
    (``data.mask_seed``), since the targets were computed on the masked input the student must see."""
    prefixes = parse_data_path(cfg.data.data_path)[1] if cfg.data.data_path else []
    n = len(cfg.ki.teacher_targets)
    check(
        not prefixes or n == len(prefixes),
        "ki.teacher_targets",
        f"{n} path(s) for {len(prefixes)} dataset(s) of data.data_path: expected one targets path per dataset, "
        "in the same order",
    )
    check(
        cfg.model.causal or cfg.data.mask_seed is not None,
        "data.mask_seed",
        f"is required with ki.teacher_targets for the masked-LM model.family {cfg.model.family!r}: the teacher "
        "saw each token under a static mask; set data.mask_seed (and data.mask_prob) to the ones the targets "
        "were computed with (their .idx header, 'masking')",
    )


def check_positions(model: ModelConfig, seq_length: int, prefix: str = "model") -> None:
    """Every position id of a ``seq_length``-token sample indexes ``model``'s position table (or RoPE range).

    RoBERTa's ids run up to pad_token_id + seq_length (transformers' rule) over a table of
    max_position_embeddings + pad_token_id + 1 rows; others run up to seq_length - 1 over max_position_embeddings.
    """
    if model.sliding_window is not None and seq_length > model.sliding_window:
        raise ConfigError(
            "data.seq_length",
            f"{seq_length} is longer than {prefix}.sliding_window={model.sliding_window}: sliding-window attention "
            f"is only supported where the window covers the whole sample; set data.seq_length <= "
            f"{model.sliding_window}",
        )
    if model.positions_fit(seq_length):
        return
    last = seq_length - 1 + model.position_id_offset
    if model.padding_positions:
        raise ConfigError(
            "data.seq_length",
            f"{seq_length} tokens take RoBERTa position ids up to {prefix}.pad_token_id + data.seq_length = "
            f"{model.pad_token_id} + {seq_length} = {last}, past the {model.position_table_size}-row position "
            f"table ({prefix}.max_position_embeddings + {prefix}.pad_token_id + 1 = "
            f"{model.max_position_embeddings} + {model.pad_token_id} + 1): raise "
            f"{prefix}.max_position_embeddings to at least {seq_length} or shorten data.seq_length",
        )
    raise ConfigError(
        "data.seq_length",
        f"{seq_length} is longer than {prefix}.max_position_embeddings={model.max_position_embeddings}",
    )


def check_split(model: ModelConfig, tp: int, pp: int = 1, prefix: str = "model") -> None:
    """``model``'s heads, key/value heads and MLP divide over ``tp`` ranks, and its layers over ``pp`` stages."""
    check(
        model.num_attention_heads % tp == 0,
        f"{prefix}.num_attention_heads",
        f"{model.num_attention_heads} heads are not divisible by parallel.tensor_parallel={tp}",
    )
    check(
        model.kv_heads % tp == 0,
        f"{prefix}.num_key_value_heads",
        f"{model.kv_heads} key/value heads are not divisible by parallel.tensor_parallel={tp}",
    )
    check(
        model.ffn_size % tp == 0,
        f"{prefix}.ffn_hidden_size",
        f"{model.ffn_size} is not divisible by parallel.tensor_parallel={tp}",
    )
    check(
        pp <= model.num_layers,
        "parallel.pipeline_parallel",
        f"{pp} pipeline stages are more than the {model.num_layers} layers of {prefix}",
    )


def teacher_on_student_vocabulary(student: ModelConfig, teacher: ModelConfig) -> ModelConfig:
    """The teacher as it runs beside ``student``: a teacher with more embedding rows than the student's
    (tokenizer-sized) vocabulary, e.g. Qwen2.5's 151,936 rows for a 151,665-token tokenizer, runs with the
    student's ``vocab_size``: its rows beyond it become padding (-inf logits, like the student's) or are dropped
    past the padded size, so the KD softmax and the teacher's LM loss run over the real vocabulary. Any other
    teacher is returned as is."""
    if teacher.vocab_size <= student.vocab_size:
        return teacher
    return dataclasses.replace(teacher, vocab_size=student.vocab_size)


def check_teacher(
    student: ModelConfig,
    teacher: ModelConfig,
    tp: int,
    seq_length: int | None = None,
    pp: int = 1,
    prefix: str = "ki.teacher",
) -> None:
    """``teacher`` fits ``student``: the same tokenizer (at least the student's vocabulary rows, the same padded
    vocabulary once the teacher's extra rows are dropped, RoBERTa padding id), the same kind of attention, a
    split over ``tp`` ranks and ``pp`` stages, and (given ``seq_length``) positions for every sample. The one
    rule, run by :meth:`Config.validate` for a ``ki.teacher`` in the config and by
    :func:`megatron_ki.ki.teacher.check_teacher_fits` for the teacher a run loads. Rows beyond the student's
    vocabulary are accepted (:func:`teacher_on_student_vocabulary`): that the tokenizers agree is checked on
    the tokenizer files (``convert/tokenizer.py``)."""
    check(
        teacher.vocab_size >= student.vocab_size,
        f"{prefix}.vocab_size",
        f"teacher vocabulary {teacher.vocab_size} differs from the student's {student.vocab_size}: a teacher needs "
        f"at least the student's {student.vocab_size} rows (rows beyond them are dropped); teacher and student "
        "must share the tokenizer",
    )
    running = teacher_on_student_vocabulary(student, teacher)
    padded, own = running.padded_vocab_size(tp), student.padded_vocab_size(tp)
    check(
        padded == own,
        f"{prefix}.make_vocab_size_divisible_by",
        f"teacher padded vocabulary {padded} differs from the student's {own} at parallel.tensor_parallel={tp}: "
        f"set the same make_vocab_size_divisible_by ({prefix}.make_vocab_size_divisible_by="
        f"{teacher.make_vocab_size_divisible_by}, model.make_vocab_size_divisible_by="
        f"{student.make_vocab_size_divisible_by})",
    )
    check_split(teacher, tp, pp, prefix)
    check(
        teacher.causal == student.causal,
        f"{prefix}.family",
        f"teacher family {teacher.family!r} and student family {student.family!r} differ in attention (causal "
        "vs bidirectional): their distributions are over different tasks",
    )
    check(
        teacher.pads_like(student),
        f"{prefix}.pad_token_id",
        f"teacher pad_token_id {teacher.pad_token_id} differs from model.pad_token_id={student.pad_token_id}: "
        "teacher and student share the tokenizer, and the teacher's RoBERTa positions (from pad_token_id + 1) "
        "must skip the same padding tokens",
    )
    if seq_length is not None:
        check_positions(teacher, seq_length, prefix)
