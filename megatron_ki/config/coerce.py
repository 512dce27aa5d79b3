"""Checking a value against a field's annotation, and building a dataclass from a mapping.

The only conversions are to float (from an int, or from a string such as ``'3e-4'`` that YAML 1.1 leaves a
string); everything else must already have the annotated type, and an unknown key is an error naming the keys
that exist. Used by the schema (a ``ki.teacher`` given as a mapping) and by the loader (whole configs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from functools import cache
from typing import Any, Literal, Union

from .errors import ConfigError


def type_name(tp: Any) -> str:
    """An annotation as ``--help`` and the error messages spell it (``int or null``, ``gpt2|llama``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", None) or str(tp)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; the only conversions are to float (from int or '3e-4')."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise, error
            return coerce(value, options[0], key)
        for arg in options:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected a boolean (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(key, f"unsupported field type {tp!r}")


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass ``cls``."""
    return typing.get_type_hints(cls)


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and checking every type."""
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(full, f"unknown key; expected one of {sorted(names)}")
        kwargs[key] = coerce(value, hints[key], full)
    return cls(**kwargs)
