"""``save_pretrained`` / ``from_pretrained``: a directory (or Hugging Face Hub repository) holding
``config.json`` (the tokenizer's ``_target_`` config and what downstream code needs to know),
``model.safetensors`` (weights only: no pickle, nothing executed on load) and a model card.

Loading builds only classes defined inside ``imagetok`` (``utils/build.py``), and a weight file that
does not fit its config is refused with a readable list of missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from imagetok.errors import CheckpointError, ConfigValueError

if TYPE_CHECKING:
    from imagetok.tokenizer import Tokenizer

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
FORMAT_VERSION = 1


def save_pretrained(tokenizer: "Tokenizer", out_dir: str | Path, extra: dict[str, Any] | None = None,
                    card: str | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and ``README.md`` when ``card`` is given) into
    ``out_dir``. Files are written into a temporary sibling directory first and moved into place, so
    an interrupted export never leaves a half-written weight file next to a valid config."""
    if tokenizer.config is None:
        raise ValueError("this Tokenizer has no config (build it with Tokenizer.from_config to be able to save it)")
    from imagetok import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "imagetok_version": __version__, "tokenizer": tokenizer.config,
              "codebook_sizes": list(tokenizer.codebook_sizes), "downsample_factor": tokenizer.downsample_factor,
              "image_value_range": [-1.0, 1.0], **(extra or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "imagetok_version": __version__})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if card is not None:
            (staging / CARD_NAME).write_text(card)
        for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
            if (staging / name).exists():
                os.chmod(staging / name, 0o644)  # readable like any other exported file
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _resolve_files(name_or_path: str | Path, revision: str | None) -> tuple[Path, Path]:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config, weights):
            if not f.is_file():
                raise FileNotFoundError(f"{path} is not a save_pretrained directory: {f.name} is missing")
        return config, weights
    if path.exists() or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: neither a save_pretrained directory nor a Hub id 'owner/name'")
    from huggingface_hub import hf_hub_download

    return (Path(hf_hub_download(str(name_or_path), CONFIG_NAME, revision=revision)),
            Path(hf_hub_download(str(name_or_path), WEIGHTS_NAME, revision=revision)))


def key_mismatch_report(model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """A readable diff of ``state`` (a file's tensors) against ``model.state_dict()`` (or a state dict),
    or None when every name and shape matches."""
    own = model.state_dict() if isinstance(model, torch.nn.Module) else model
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        return None
    lines = []
    for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                         ("different shapes", shapes)):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items[:20]] + ([f"    ... {len(items) - 20} more"] if len(items) > 20 else [])
    return "\n".join(lines)


def load_pretrained(name_or_path: str | Path, revision: str | None = None) -> "Tokenizer":
    """Build the tokenizer of a ``save_pretrained`` directory or Hub id and load its weights; eval mode."""
    from imagetok.tokenizer import Tokenizer

    config_path, weights_path = _resolve_files(name_or_path, revision)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("tokenizer"), dict):
        raise ConfigValueError("config.json:tokenizer", type(config.get("tokenizer") if isinstance(config, dict) else config).__name__,
                               "a mapping with encoder, quantizer and decoder _target_ entries")
    tokenizer = Tokenizer.from_config(config["tokenizer"])  # allowlisted: only imagetok modules
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own SafetensorError (truncated or not a safetensors file)
        raise CheckpointError(f"{weights_path} is not a readable safetensors file (truncated or corrupt: {err})") from None
    report = key_mismatch_report(tokenizer, state)
    if report:
        raise CheckpointError(f"{weights_path} does not match {config_path}:\n{report}")
    tokenizer.load_state_dict(state, strict=True)
    return tokenizer.eval()
