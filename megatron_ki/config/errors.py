"""The one error of the configuration, shared by the schema, the type checks and the loader."""

from __future__ import annotations

from megatron_ki.errors import EXIT_USAGE, MegatronKIError


class ConfigError(MegatronKIError, ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent; the message names the key."""

    exit_code = EXIT_USAGE

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        """The message without the key, for a caller that names the culprit its own way."""
        super().__init__(f"config error at '{key}': {message}")


def check(cond: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` at ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(key, message)
