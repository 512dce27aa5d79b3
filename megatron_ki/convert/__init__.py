"""Conversion between the framework's state dicts and other formats (Hugging Face transformers)."""

from .hf import (
    MAPPINGS,
    Rule,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load_hf_model,
    rules_for,
    to_hf_state_dict,
)

__all__ = [
    "MAPPINGS",
    "Rule",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "load_hf_model",
    "rules_for",
    "to_hf_state_dict",
]
