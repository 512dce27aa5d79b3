"""Model FLOPs per token, the KI teacher's share of them, and device peaks for MFU.

Accounting (Megatron-LM / PaLM appendix B): only dense matmuls count, 2 FLOPs per multiply-add. For one
token of a sequence of length ``s``, per transformer layer, with ``h`` hidden, ``kv = kv_heads * head_dim``
and ``f`` the FFN width::

    QKV projection        2 * h * (h + 2 * kv)        (grouped-query attention: q plus 2 smaller k, v)
    attention scores      2 * s * h                   (q . k against all s keys, every head)
    attention context     2 * s * h                   (probabilities x values)
    output projection     2 * h * h
    MLP                   2 * 2 * h * f               (2 * 3 * h * f for SwiGLU: gate, up, down)

plus, once per token, the vocabulary projection ``2 * h * V`` with the *padded* vocabulary ``V`` and, for
BERT/RoBERTa, the MLM head's dense layer ``2 * h * h``. The attention terms count the full ``s x s`` score
matrix even for causal models, as Megatron and PaLM do (a causal kernel may skip half of it; counting it
keeps MFU comparable with those papers). Pass ``causal_attention_halved=True`` for the other convention.
Training is 3x the forward (the backward computes gradients for inputs and for weights, 2x the forward);
activation recomputation is not counted (that would be hardware, not model, FLOPs). Embedding lookups,
norms, softmax and the KL itself are elementwise and ignored.
"""

from __future__ import annotations

import os

from megatron_ki.config import ModelConfig

PEAK_FLOPS_ENV = "MEGATRON_KI_PEAK_FLOPS"

# Dense (no sparsity) peak FLOP/s per device, from the vendors' data sheets. fp32 is the non-tensor-core
# rate, tf32 the tensor-core rate a matmul gets with torch.backends.cuda.matmul.allow_tf32.
_H100_SXM = {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}
_H100_PCIE = {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}
_A100 = {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}
# First match wins: more specific names come first. H200 and GH200 share the H100 SXM compute die.
_DEVICE_PEAKS = (
    ("H100 PCIE", _H100_PCIE),
    ("H200", _H100_SXM),
    ("H100", _H100_SXM),
    ("A100", _A100),
)
_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "tf32": "tf32",
}


def _layer_forward_flops(cfg: ModelConfig, seq_length: int, causal_attention_halved: bool) -> float:
    h, f = cfg.hidden_size, cfg.ffn_size
    kv, q = cfg.kv_heads * cfg.head_dim, cfg.attention_width  # q == h unless model.kv_channels is set
    qkv = 2 * h * (q + 2 * kv)
    attention = 2 * 2 * seq_length * q
    if causal_attention_halved and cfg.causal:
        attention /= 2
    out_proj = 2 * q * h
    mlp = 2 * (3 if cfg.activation == "swiglu" else 2) * h * f
    return float(qkv + attention + out_proj + mlp)


def model_flops_per_token(
    cfg: ModelConfig,
    seq_length: int,
    training: bool = True,
    tp: int = 1,
    causal_attention_halved: bool = False,
) -> float:
    """Matmul FLOPs per token of one forward (x3 with ``training``) over sequences of ``seq_length``.

    ``tp`` only changes the padded vocabulary (Megatron pads to a multiple of divisible_by x tp).
    """
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    h = cfg.hidden_size
    forward = cfg.num_layers * _layer_forward_flops(cfg, seq_length, causal_attention_halved)
    forward += 2 * h * cfg.padded_vocab_size(tp)
    if not cfg.causal:  # BERT/RoBERTa MLM head: dense h x h before the tied decoder
        forward += 2 * h * h
    return forward * (3.0 if training else 1.0)


def teacher_forward_flops_per_token(teacher_cfg: ModelConfig, seq_length: int, tp: int = 1) -> float:
    """The frozen teacher runs forward only (no gradients), so its cost is one forward pass."""
    return model_flops_per_token(teacher_cfg, seq_length, training=False, tp=tp)


def training_flops_per_token(
    student: ModelConfig, seq_length: int, teacher: ModelConfig | None = None, tp: int = 1
) -> float:
    """FLOPs per trained token of a step: the student's forward+backward plus, while KI is on, the teacher's
    forward. Use this for cumulative compute so KI runs are charged for their teacher."""
    flops = model_flops_per_token(student, seq_length, training=True, tp=tp)
    if teacher is not None:
        flops += teacher_forward_flops_per_token(teacher, seq_length, tp=tp)
    return flops


def ki_flop_share(student: ModelConfig, teacher: ModelConfig, seq_length: int, tp: int = 1) -> float:
    """Teacher forward FLOPs as a fraction of the student's training FLOPs (the KI overhead while a_t > 0)."""
    return teacher_forward_flops_per_token(teacher, seq_length, tp=tp) / model_flops_per_token(
        student, seq_length, training=True, tp=tp
    )


def _normalise_dtype(dtype: str) -> str:
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r} for peak FLOPs; expected one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[key]


def peak_flops_for_name(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a device called ``device_name`` (as torch.cuda.get_device_name reports it)."""
    key = _normalise_dtype(dtype)
    name = device_name.upper()
    for pattern, peaks in _DEVICE_PEAKS:
        if pattern in name:
            return peaks[key]
    return None


def device_peak_flops(dtype: str, device: object = None) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` (bf16, fp16, fp32, tf32), or None when unknown.

    The environment variable MEGATRON_KI_PEAK_FLOPS (a number such as ``1e12``) wins everywhere, so CPU runs
    and unlisted GPUs can still report MFU. Otherwise CUDA devices are matched by name (H100 SXM/PCIe, H200,
    A100); CPUs and other devices return None.
    """
    key = _normalise_dtype(dtype)
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(
                f"{PEAK_FLOPS_ENV}={env!r} is not a number (expected FLOP/s, e.g. 1e12)"
            ) from None
        if value <= 0:
            raise ValueError(f"{PEAK_FLOPS_ENV}={env!r} must be positive")
        return value
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), key)


def mfu(
    tokens_per_s: float, flops_per_token: float, peak_flops: float | None, num_devices: int = 1
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all ``num_devices`` devices.

    ``tokens_per_s`` is the global throughput (all data-parallel replicas), so the peak is multiplied by the
    number of devices that produced it. None when the peak is unknown.
    """
    if peak_flops is None or peak_flops <= 0:
        return None
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    return tokens_per_s * flops_per_token / (peak_flops * num_devices)


LM_LOSS_FLOPS_PER_LOGIT = 150.0
"""The LM cross-entropy's forward + backward per logit, in matmul-FLOP equivalents: on the CPU it takes about a
tenth of a hidden-256 head's matmul forward + backward (benchmarks/bench_loss_parts.py, RESULTS.md). Only used
to weigh pipeline stages, never in reported FLOPs."""
KD_FLOPS_PER_LOGIT = 350.0
"""The divergence's forward + backward per logit beyond the LM loss (both softmaxes and the KL gradient), in
the same units, from the same benchmark."""


def pipeline_layer_costs(
    student: ModelConfig,
    seq_length: int,
    teacher: ModelConfig | None = None,
    teacher_layers: list[list[int]] | None = None,
    tp: int = 1,
) -> list[float]:
    """Per-token cost of each pipeline layer ``[embedding, block 0..L-1, head]`` for a compute-balanced split.

    Student layers count forward + backward (x3), the teacher's layers beside them (``teacher_layers[i]``
    runs beside block ``i``) forward only, and the head also carries the loss: the LM cross-entropy and,
    with a teacher, its head and the divergence (elementwise passes over the vocabulary that the matmul count
    leaves out, yet on a small model they weigh like a layer). Embedding lookups count 0.
    """
    vocab = student.padded_vocab_size(tp)
    block = 3.0 * _layer_forward_flops(student, seq_length, False)
    costs = [0.0] + [block] * student.num_layers
    head = 3.0 * 2 * student.hidden_size * vocab + LM_LOSS_FLOPS_PER_LOGIT * vocab
    if not student.causal:
        head += 3.0 * 2 * student.hidden_size**2
    if teacher is not None:
        beside = teacher_layers or [[] for _ in range(student.num_layers)]
        teacher_layer = _layer_forward_flops(teacher, seq_length, False)
        for i, layers in enumerate(beside):
            costs[1 + i] += len(layers) * teacher_layer
        head += 2 * teacher.hidden_size * vocab + KD_FLOPS_PER_LOGIT * vocab
        if not teacher.causal:
            head += 2 * teacher.hidden_size**2
    return [*costs, head]
