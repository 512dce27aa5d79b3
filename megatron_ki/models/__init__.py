"""Tensor-parallel transformer models (GPT-2, Llama, BERT, RoBERTa) built from separable pieces."""

from __future__ import annotations

from torch.distributed import ProcessGroup

from megatron_ki.config import ModelConfig
from megatron_ki.tensor_parallel import TPRngTracker

from .bert import BertModel
from .gpt import GPTModel
from .transformer import (
    Embedding,
    LMHead,
    MLMHead,
    TransformerBlock,
    TransformerLanguageModel,
    core_attention,
    gather_logits,
    partition_info,
    rotary_cos_sin,
)


def model_class(cfg: ModelConfig) -> type[TransformerLanguageModel]:
    """GPTModel for gpt2/llama, BertModel for bert/roberta."""
    if cfg.family in GPTModel.families:
        return GPTModel
    if cfg.family in BertModel.families:
        return BertModel
    raise ValueError(
        f"model.family: expected one of gpt2, llama, qwen2, qwen3, mistral, bert, roberta, got {cfg.family!r}"
    )


def build_model(
    cfg: ModelConfig,
    tp_group: ProcessGroup | None = None,
    seed: int = 0,
    rng_tracker: TPRngTracker | None = None,
    layer_range: tuple[int, int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    sequence_parallel: bool = False,
) -> TransformerLanguageModel:
    """Build the model of ``cfg.family`` (or the part of it a pipeline stage holds) on this TP rank;
    ``sequence_parallel``: Megatron-LM's sequence parallelism over ``tp_group`` (``parallel.sequence_parallel``)."""
    return model_class(cfg)(
        cfg,
        tp_group=tp_group,
        seed=seed,
        rng_tracker=rng_tracker,
        layer_range=layer_range,
        pre_process=pre_process,
        post_process=post_process,
        sequence_parallel=sequence_parallel,
    )


__all__ = [
    "BertModel",
    "Embedding",
    "GPTModel",
    "LMHead",
    "MLMHead",
    "TransformerBlock",
    "TransformerLanguageModel",
    "build_model",
    "core_attention",
    "gather_logits",
    "model_class",
    "partition_info",
    "rotary_cos_sin",
]
