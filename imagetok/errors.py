"""Errors that name the config key at fault, so a bad value fails before training with a readable line."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
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


class CheckpointError(ValueError):
    """A checkpoint or save_pretrained directory is not what it should be: not ours, corrupt JSON, or
    weights that do not fit the config (the message lists the mismatched keys)."""


class ImageLoadError(RuntimeError):
    """An image file is missing, truncated or not an image; the message names the file."""


# What a user can fix (a config value, a missing file or weights, unreadable data): one line, not a traceback.
USER_ERRORS = (ConfigValueError, CheckpointError, MissingWeightsError, ImageLoadError, FileNotFoundError)


def user_message(err: BaseException) -> str:
    """The one line to show for ``err``. An error raised inside a DataLoader worker comes back wrapped
    with the worker's whole traceback in its message; only its last line (the original message) is kept."""
    message = str(err)
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return message


@contextlib.contextmanager
def exit_on_user_error(code: int = 2) -> Iterator[None]:
    """For the command-line entry points: a :data:`USER_ERRORS` exception becomes one ``error: ...``
    log line and exit status ``code``; anything else (a bug) keeps its traceback."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except USER_ERRORS as err:
        logging.getLogger("imagetok").error("error: %s", user_message(err))
        sys.exit(code)
    except MissingMandatoryValue as err:  # a `???` key the user did not give
        key = err.full_key or "a required value"
        logging.getLogger("imagetok").error("error: %s is required and was not given: add %s=... to the command line", key, key)
        sys.exit(code)


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigValueError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigValueError(key, value, allowed)
