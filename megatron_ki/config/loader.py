"""Reading a configuration: YAML files with includes, dotted command-line overrides, ``--help``.

``[--config FILE ...] [--group.key VALUE ...]``: each file's optional ``base:`` (a path or list, relative to
the file) is merged under it, later files win, then each ``--group.key VALUE`` (or ``--group.key=VALUE``)
replaces one value, read as YAML would read it (a ``str`` field keeps the text; a list field takes several
values). The result is built into the :mod:`~megatron_ki.config.schema` dataclasses with every type checked
(:mod:`~megatron_ki.config.coerce`); a bad file, key or value raises :class:`ConfigError` naming it.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Union

import yaml

from .coerce import build, field_types, type_name
from .errors import ConfigError
from .schema import Config, ModelConfig


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate (per group) a :class:`Config` from a nested mapping."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping of config groups, got {type(data).__name__}")
    return build(Config, data, "")


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it (``12`` -> int, ``true`` -> bool, ``[a, b]`` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--group.key value`` (or ``--group.key=value``) pairs to a nested mapping."""
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--"):
            raise ConfigError(arg, "expected an option of the form --group.key VALUE")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            texts = [text]
            i += 1
        else:
            key = arg[2:]
            j = i + 1
            while j < len(items) and not items[j].startswith("--"):
                j += 1
            texts = items[i + 1 : j]
            if not texts:
                raise ConfigError(key, "is missing its value")
            i = j
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError(key, "expected a dotted key such as --model.num_layers")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{p}' is not a group")
        hint = _leaf_hint(parts)
        is_list = typing.get_origin(hint) is list
        if len(texts) > 1 and not is_list:
            raise ConfigError(key, f"takes one value, got {len(texts)}: {texts}")
        if is_list:
            value: Any = [_parse_scalar(t) for t in texts]
            if len(value) == 1 and isinstance(value[0], list):  # --key '[a, b]'
                value = value[0]
        elif hint is str or (
            typing.get_origin(hint) in (Union, types.UnionType) and str in typing.get_args(hint)
        ):
            value = texts[0] if texts[0] not in ("null", "None", "~") else None
        else:
            value = _parse_scalar(texts[0])
        node[parts[-1]] = value
    return data


def _leaf_hint(parts: list[str]) -> Any:
    cls: Any = Config
    for p in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hint = field_types(cls).get(p)
        if hint is None:
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else hint
    return cls


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursing into nested mappings (YAML bases, user DeepSpeed JSON)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; its optional ``base:`` (a path or list, relative to the file) is merged first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError("base", f"{path} includes itself through 'base'")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            "--config", f"{path} must hold a mapping of config groups, got {type(loaded).__name__}"
        )
    bases = loaded.pop("base", None) or []
    merged: dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml(path.parent / b, (*_seen, path.resolve())))
    return deep_merge(merged, loaded)


def load_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Load YAML file(s) (later ones win), apply dotted overrides, and build a per-group validated Config."""
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    data: dict[str, Any] = {}
    for path in paths:
        data = deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def parse_args(argv: list[str]) -> Config:
    """Command line of the entry points: ``[--config FILE ...] [--group.key VALUE ...]``; ``--help`` lists keys."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: [--config FILE ...] [--group.key VALUE ...]\n\noptions:")
        print("\n".join("  " + line for line in describe()))
        raise SystemExit(0)
    paths, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config", "is missing its file")
            paths.append(argv[i + 1])
            i += 2
        elif argv[i].startswith("--config="):
            paths.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return load_config(paths, rest)


def model_config_from_yaml(path: str | Path) -> ModelConfig:
    """Read a YAML file holding either a ``model:`` group or the model fields themselves."""
    data = read_yaml(path)
    if "model" in data:
        data = data["model"]
    return build(ModelConfig, data, "model")


def upgrade_stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config stored by an older version (checkpoint metadata), rewritten to today's fields (a copy).

    Before RoBERTa's position offset was derived, a config stored ``position_offset`` (2) beside the padding id;
    with a padding id other than 1 the model had a table of max_position_embeddings + position_offset rows and
    positions from pad_token_id + 1, which is the same model, table and positions, as
    max_position_embeddings + position_offset - pad_token_id - 1 under the derived rule.
    """
    data = copy.deepcopy(data)
    ki = data.get("ki")
    for m in (data.get("model"), ki.get("teacher") if isinstance(ki, dict) else None):
        if not isinstance(m, dict) or not isinstance(m.get("position_offset"), int):
            continue
        offset, pad = m["position_offset"], m.get("pad_token_id")
        roberta = m.get("family") == "roberta" and m.get("position_embedding", "learned") == "learned"
        if not (roberta and isinstance(pad, int) and pad >= 0 and offset > 0 and offset != pad + 1):
            continue  # agrees (or cannot be expressed today): ModelConfig accepts it or says why not
        default = ModelConfig.__dataclass_fields__["max_position_embeddings"].default
        positions = m.get("max_position_embeddings", default) + offset - (pad + 1)
        if positions > 0:
            m["max_position_embeddings"] = positions
            del m["position_offset"]
    return data


# ---------------------------------------------------------------------------------------------- docs
@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value.strip()
    return docs


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per leaf option: ``--group.key (type, default): doc`` for ``--help`` output."""
    lines = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = field_types(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            lines.extend(describe(hint, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        lines.append(f"--{key} ({type_name(hint)}, default {default}): {docs.get(f.name, '')}")
    return lines
