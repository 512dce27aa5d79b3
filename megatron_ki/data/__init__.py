"""Data pipeline: Megatron MMIDIDX files, tokenizers, GPT and MLM datasets, blending and sampling.

Names are imported lazily so that the command-line tools (which need only ``indexed`` and ``tokenizers``)
start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlendedDataset": "blending",
    "PretrainingSampler": "blending",
    "build_train_valid_test_datasets": "blending",
    "build_datasets_from_config": "blending",
    "parse_data_path": "blending",
    "split_ranges": "blending",
    "GPTDataset": "gpt_dataset",
    "IndexedDataset": "indexed",
    "IndexedDatasetBuilder": "indexed",
    "IndexedDatasetError": "indexed",
    "EodMismatchError": "indexed",
    "merge_datasets": "indexed",
    "recorded_eod": "indexed",
    "MLMDataset": "mlm_dataset",
    "Tokenizer": "tokenizers",
    "TokenizerError": "tokenizers",
    "build_tokenizer": "tokenizers",
    "resolve_eod_token": "tokenizers",
    "TokenRangeError": "token_range",
    "check_token_range": "token_range",
    "dataset_prefixes": "token_range",
    "max_token_id": "token_range",
    "TargetsWriter": "teacher_targets",
    "TeacherTargets": "teacher_targets",
    "TeacherTargetsError": "teacher_targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_ki.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_ki.data' has no attribute {name!r}")
