"""Which checkpoint formats ``export.py from=...`` reads, and how ``from=auto`` tells them apart.

Each source project registers one :class:`SourceFormat` next to its converter (``taming.py``,
``llamagen.py``, ...): a detector that looks only at the names of the loaded checkpoint's entries, a
sentence saying what it looks for, and the converter. ``from=auto`` runs every detector and needs
exactly one to match; a file that matches none is refused with the list of what was looked for.

A format whose converter needs more than the checkpoint (SEED-Voken's ``magvit2``: the training yaml,
EMA or raw weights) declares the names of those ``export.py`` keys in ``options``; its ``detect`` and
``convert`` then receive them as keyword arguments, and every other format is called with the
checkpoint alone (export passes all the keys it has; each format takes only those it declares).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imagetok.errors import CheckpointError, ConfigValueError

if TYPE_CHECKING:
    from imagetok.tokenizer import Tokenizer


@dataclass(frozen=True)
class KeyLayout:
    """Where a format keeps its tensors and which names they must (and must not) have.

    ``containers``: top-level entries that may hold the state dict, in order of preference (the first
    one present is used); a checkpoint with none of them is taken as a bare state dict.
    ``required`` / ``excluded``: exact tensor names, or prefixes ending in ``.`` (``encoder.down.``
    matches ``encoder.down.0.block.0.conv1.weight``)."""

    containers: tuple[str, ...]
    required: tuple[str, ...]
    excluded: tuple[str, ...] = ()

    def state_of(self, checkpoint: Any) -> dict[str, Any] | None:
        """The state dict inside ``checkpoint`` as this layout stores it, or None if there is none."""
        if not isinstance(checkpoint, dict):
            return None
        for name in self.containers:
            if checkpoint.get(name) is not None:
                state = checkpoint[name]
                return state if isinstance(state, dict) else None
        return checkpoint

    def matches(self, checkpoint: Any) -> bool:
        state = self.state_of(checkpoint)
        if state is None:
            return False
        keys = [k for k in state if isinstance(k, str)]
        return (all(any(_name_matches(k, want) for k in keys) for want in self.required)
                and not any(_name_matches(k, bad) for k in keys for bad in self.excluded))

    def describe(self) -> str:
        where = " or ".join(f'{{"{name}": ...}}' for name in self.containers)
        text = f"{where} or a bare state dict with {', '.join(_shown(k) for k in self.required)}"
        return text + (f", without {', '.join(_shown(k) for k in self.excluded)}" if self.excluded else "")


def _name_matches(key: str, pattern: str) -> bool:
    return key.startswith(pattern) if pattern.endswith(".") else key == pattern


def _shown(pattern: str) -> str:
    return f"{pattern}*" if pattern.endswith(".") else pattern


@dataclass(frozen=True)
class SourceFormat:
    """One checkpoint format. ``detect(checkpoint)``: whether a loaded checkpoint is in this format,
    from its entries' names alone. ``looks_for``: what ``detect`` needs, in words (shown when no format
    matches). ``convert(checkpoint)``: the :class:`Tokenizer`, raising :class:`CheckpointError` for a
    checkpoint it cannot convert; None for imagetok's own training checkpoints, which
    :func:`imagetok.export.run.export` exports itself (EMA or raw weights, model card, serving).
    ``options``: export keys (``config``, ``weights``...) that ``detect`` and ``convert`` take as
    keyword arguments besides the checkpoint; none for most formats."""

    name: str
    looks_for: str
    detect: Callable[..., bool]
    convert: Callable[..., Tokenizer] | None
    options: tuple[str, ...] = ()

    def _own(self, options: dict[str, Any]) -> dict[str, Any]:
        return {key: options[key] for key in self.options if key in options}

    def matches(self, checkpoint: Any, **options: Any) -> bool:
        """``detect`` with the options this format declares (the others are not its business)."""
        return self.detect(checkpoint, **self._own(options))

    def converted(self, checkpoint: Any, **options: Any) -> Tokenizer:
        """``convert`` with the options this format declares."""
        assert self.convert is not None, f"{self.name} checkpoints are exported by imagetok.export.run"
        return self.convert(checkpoint, **self._own(options))


FORMATS: dict[str, SourceFormat] = {}


def register(source: SourceFormat) -> SourceFormat:
    if source.name in FORMATS:
        raise ValueError(f"a checkpoint format named {source.name!r} is registered twice")
    FORMATS[source.name] = source
    return source


def register_key_layout(name: str, layout: KeyLayout, convert: Callable[[Any], Tokenizer]) -> SourceFormat:
    """Register a format that is recognised by its tensors' names alone (most are)."""
    return register(SourceFormat(name, layout.describe(), layout.matches, convert))


def describe_contents(checkpoint: Any) -> str:
    """What a loaded checkpoint holds, briefly: its top-level keys and the first names of a state dict."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    keys = [str(k) for k in checkpoint]
    text = f"its top-level keys are {_first(keys, 8)}"
    nested = [k for k in ("state_dict", "model", "ema") if isinstance(checkpoint.get(k), dict)]
    if nested:
        text += f", {nested[0]} starts {_first([str(k) for k in checkpoint[nested[0]]], 4)}"
    if not nested and any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        text = f"its tensors are {_first(keys, 4)}"
    return text


def _first(items: list[str], n: int) -> str:
    shown = ", ".join(items[:n]) or "none"
    return f"[{shown}{f', ... {len(items) - n} more' if len(items) > n else ''}]"


def detect_format(checkpoint: Any, path: Path, **options: Any) -> SourceFormat:
    """The one registered format ``checkpoint`` (loaded from ``path``) is in; a :class:`CheckpointError`
    naming every format and what it needs when none matches, or the candidates when several do.
    ``options``: export's keys, given to the formats that declare them (see :class:`SourceFormat`)."""
    found = [source for source in FORMATS.values() if source.matches(checkpoint, **options)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"{path} fits several checkpoint formats ({', '.join(s.name for s in found)}): "
                              f"choose one with from=<name>")
    looked_for = "; ".join(f"{s.name}: {s.looks_for}" for s in FORMATS.values())
    raise CheckpointError(f"{path} is in none of the checkpoint formats from=auto knows ({looked_for}); "
                          f"{describe_contents(checkpoint)}")


def convert_checkpoint(name: str, checkpoint: Any, path: Path, **options: Any) -> Tokenizer:
    """``checkpoint`` (loaded from ``path``) converted by format ``name``'s converter. A checkpoint in
    another layout is refused naming what ``name`` needs and, when it is in another known format, that one.
    ``options``: export's keys (``config=``, ``weights=``); each format receives those it declares.
    Every refusal is one :class:`CheckpointError` line starting with ``path``."""
    source = FORMATS[name]
    if not source.matches(checkpoint, **options):
        others = [s.name for s in FORMATS.values() if s.name != name and s.matches(checkpoint, **options)]
        found = (f"it looks like a {others[0]} checkpoint: use from={others[0]} (or from=auto)" if others
                 else describe_contents(checkpoint))
        raise CheckpointError(f"{path} is not a {name} checkpoint (from={name} needs {source.looks_for}); {found}")
    try:
        return source.converted(checkpoint, **options)
    except CheckpointError as err:
        raise CheckpointError(f"{path} ({name}): {err}") from None
    except ConfigValueError:
        raise  # names the export key at fault already
    except ValueError as err:  # a value in the file that no imagetok module accepts: the user's to fix, one line
        raise CheckpointError(f"{path} ({name}): {' '.join(str(err).split())}") from None
