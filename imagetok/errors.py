"""Errors that name the config key at fault, so a bad value fails before training with a readable line."""

from __future__ import annotations

from typing import Any


class ConfigValueError(ValueError):
    """A config value is invalid. ``key`` is the dotted key (prefixed as the error bubbles up to the
    config group that built the object), ``allowed`` says what would be accepted."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: allowed values are {allowed}")

    def with_prefix(self, prefix: str) -> "ConfigValueError":
        return ConfigValueError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


class MissingWeightsError(RuntimeError):
    """Pretrained weights (LPIPS VGG, FID Inception, teachers) are neither on disk nor downloadable."""


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigValueError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigValueError(key, value, allowed)
