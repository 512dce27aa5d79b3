"""Masked language models: BERT (token types, exact GELU) and RoBERTa (padding-offset positions), post-LN
encoders with an embedding LayerNorm and an MLM head tied to the word embedding."""

from __future__ import annotations

from .transformer import MLMHead, TransformerLanguageModel


class BertModel(TransformerLanguageModel):
    """Bidirectional encoder + MLM head; ``forward(input_ids, attention_mask, token_type_ids)`` -> logits."""

    head_class = MLMHead
    families = ("bert", "roberta")
