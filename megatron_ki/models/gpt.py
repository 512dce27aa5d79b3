"""Causal language models: GPT-2 (learned positions, LayerNorm, tanh-GELU, tied) and Llama (RoPE, RMSNorm,
SwiGLU, GQA) with its kin Qwen2, Qwen3 and Mistral, all the shared tensor-parallel transformer with different
switches."""

from __future__ import annotations

from .transformer import LMHead, TransformerLanguageModel


class GPTModel(TransformerLanguageModel):
    """Decoder-only causal LM; ``forward(input_ids, attention_mask=None, ...)`` -> vocab-sharded logits."""

    head_class = LMHead
    families = ("gpt2", "llama", "qwen2", "qwen3", "mistral")
