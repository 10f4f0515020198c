"""Load a :class:`Tokenizer` out of a Lightning training checkpoint, safely."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from imagetok.errors import CheckpointError, ConfigValueError
from imagetok.export.pretrained import key_mismatch_report
from imagetok.tokenizer import Tokenizer

_PREFIX = {"ema": "ema.module.", "raw": "tokenizer."}


def load_tokenizer_from_checkpoint(path: str | Path, weights: Literal["ema", "raw"] = "ema") -> Tokenizer:
    """Build the tokenizer recorded in a training checkpoint and load its EMA (default) or raw weights.
    Unpickling is ``weights_only``; a missing or unexpected key is reported by name. Returns eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if weights not in _PREFIX:
        raise ConfigValueError("weights", weights, "'ema' or 'raw'")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
