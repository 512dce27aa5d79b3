"""Typed configuration: one dataclass per concern, validated where it is defined, loaded from YAML and
dotted command-line overrides (``--model.num_layers 12``).

- :mod:`.schema`: the groups (``model``, ``parallel``, ``ki``, ``data``, ``optim``, ``train``, ``checkpoint``,
  ``logging``) with their docs and checks, :meth:`Config.validate` (checks across groups), and the rules other
  layers share: :func:`parse_data_path`, :func:`parse_split`, :func:`check_teacher`, :func:`check_positions`.
- :mod:`.loader`: YAML with ``base:`` includes, overrides, ``parse_args`` and ``--help``.
- :mod:`.coerce`: a value checked against a field's annotation; :mod:`.errors`: :class:`ConfigError`.

Unknown keys, wrong types and inconsistent combinations raise :class:`ConfigError` naming the key, before any
process group exists. Import from here; the modules are the layout, not the interface.
"""

from .errors import ConfigError
from .loader import (
    apply_overrides,
    config_from_dict,
    deep_merge,
    describe,
    field_docs,
    load_config,
    model_config_from_yaml,
    parse_args,
    read_yaml,
    upgrade_stored_config,
)
from .schema import (
    TEACHER_DTYPE_FOR_PRECISION,
    CheckpointConfig,
    Config,
    DataConfig,
    KIConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    check_positions,
    check_split,
    check_teacher,
    parse_data_path,
    parse_split,
)

__all__ = [
    "TEACHER_DTYPE_FOR_PRECISION",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "KIConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_overrides",
    "check_positions",
    "check_split",
    "check_teacher",
    "config_from_dict",
    "deep_merge",
    "describe",
    "field_docs",
    "load_config",
    "model_config_from_yaml",
    "parse_args",
    "parse_data_path",
    "parse_split",
    "read_yaml",
    "upgrade_stored_config",
]
