"""Load a :class:`Tokenizer` out of a Lightning training checkpoint, safely."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from imagetok.errors import CheckpointError, ConfigValueError
from imagetok.export.pretrained import key_mismatch_report
from imagetok.tokenizer import Tokenizer

_PREFIX = {"ema": "ema.module.", "raw": "tokenizer."}


# How torch.load fails on a file it cannot read: a truncated zip is a RuntimeError, a text file a
# KeyError or UnpicklingError.
UNREADABLE = (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def unreadable_checkpoint(path: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a file ``torch.load`` failed on with ``err`` (one of :data:`UNREADABLE`)."""
    reason = str(err).split(". ")[0].strip() if isinstance(err, RuntimeError) else f"unpickling failed ({type(err).__name__} {err})"
    return CheckpointError(f"{path} is not a readable checkpoint (truncated, or not a file torch.save wrote): {reason}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a training checkpoint, with every way a file can be
    unreadable (missing, truncated, not a PyTorch file, pickled objects outside the allowlist) raised
    as one :class:`CheckpointError` (or ``FileNotFoundError``) that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as err:
        raise unreadable_checkpoint(path, err) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning training checkpoint (no state_dict)")
    return checkpoint


def load_tokenizer_from_checkpoint(path: str | Path, weights: Literal["ema", "raw"] = "ema") -> Tokenizer:
    """Build the tokenizer recorded in a training checkpoint and load its EMA (default) or raw weights.
    Unpickling is ``weights_only``; a missing or unexpected key is reported by name. Returns eval mode.
    Raises :class:`CheckpointError` for a file that is unreadable, not ours, or does not fit its config."""
    path = Path(path)
    if weights not in _PREFIX:
        raise ConfigValueError("weights", weights, "'ema' or 'raw'")
    checkpoint = read_checkpoint(path)
    try:
        config = checkpoint["hyper_parameters"]["tokenizer_config"]
    except KeyError:
        raise CheckpointError(f"{path} is not an imagetok training checkpoint (no hyper_parameters.tokenizer_config)") from None
    state = checkpoint["state_dict"]
    prefix = _PREFIX[weights]
    if weights == "ema" and not any(k.startswith(prefix) for k in state):
        raise CheckpointError(f"{path} has no EMA weights (trained with ema_decay=0); use weights='raw'")
    tokenizer = Tokenizer.from_config(config)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    report = key_mismatch_report(tokenizer, own)
    if report:
        raise CheckpointError(f"the {weights} weights in {path} do not match its tokenizer config:\n{report}")
    tokenizer.load_state_dict(own, strict=True)
    return tokenizer.eval()
