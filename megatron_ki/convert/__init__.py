"""Conversion between the framework's checkpoints and other layouts/formats.

``hf``: one mapping table per model family to and from Hugging Face transformers, streaming readers/writers.
``reshard``: framework checkpoints at any tp/pp <-> one full state dict.
``tokenizer``: sentencepiece -> Hugging Face fast tokenizer export, teacher/student tokenizer checks.
"""

from megatron_ki.checkpoint_format import CheckpointError

from .hf import (
    MAPPINGS,
    Rule,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load_hf_model,
    open_hf_model,
    rules_for,
    to_hf_state_dict,
    write_hf_weights,
)
from .reshard import load_full_state, shard_state_dict, write_checkpoint

__all__ = [
    "MAPPINGS",
    "CheckpointError",
    "Rule",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "load_full_state",
    "load_hf_model",
    "open_hf_model",
    "rules_for",
    "shard_state_dict",
    "to_hf_state_dict",
    "write_checkpoint",
    "write_hf_weights",
]
