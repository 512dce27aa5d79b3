"""Dtype names, in one place: the framework's names and safetensors' names, each to its torch dtype.

The lowest layer: torch only.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The floating-point dtypes the framework knows by name: ``model.params_dtype``, ``ki.teacher_dtype`` (once
``auto`` is resolved), ``tools/convert_checkpoint.py --dtype``."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""A safetensors header's ``dtype`` -> torch dtype (the ones this framework reads and writes)."""

SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
"""torch dtype -> its safetensors name."""
