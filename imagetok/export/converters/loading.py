"""Reading other projects' checkpoint files safely (``torch.load(weights_only=True)``, or safetensors),
including diffusers model directories (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from imagetok.errors import CheckpointError
from imagetok.export.checkpoint import UNREADABLE, unreadable_checkpoint

log = logging.getLogger(__name__)

# the weights file of a diffusers model directory (``ModelMixin.save_pretrained``), in order of preference
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def diffusers_weights_file(directory: Path) -> Path | None:
    """The weights file of a diffusers model directory, or None when ``directory`` holds none."""
    return next((directory / name for name in DIFFUSERS_WEIGHTS if (directory / name).is_file()), None)


def _pipeline_hint(path: Path) -> str:
    """Which subfolders of a diffusers pipeline directory hold a ``VQModel`` (from its ``model_index.json``)."""
    import json

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        index = {}
    names = [name for name, value in index.items() if isinstance(value, list) and value[-1:] == ["VQModel"]]
    if not names:
        return "its model_index.json names no VQModel (imagetok converts diffusers' VQModel only)"
    return "convert its VQModel folder: " + " or ".join(f"checkpoint={path / name}" for name in names)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {' '.join(str(err).split())}") from None


def _inert_class(qualified_name: str) -> type:
    """A placeholder class standing in for a pickled global we do not trust (a Lightning callback, an
    ``argparse.Namespace`` of training arguments): building it runs no code and keeps no state."""
    def _ignore(self, *args, **kwargs) -> None:
        return None

    return type(qualified_name.rsplit(".", 1)[-1], (), {"__init__": _ignore, "__setstate__": _ignore,
                                                         "__module__": "imagetok.export.converters.inert"})


def load_original_checkpoint(path: str | Path) -> Any:
    """Read another project's checkpoint with ``torch.load(weights_only=True)``.

    Published checkpoints often pickle more than tensors (old Lightning checkpoints key their callback
    states by callback class, LlamaGen's training script saves its ``argparse.Namespace``). Those
    classes are replaced by inert placeholders, so their code is never imported or run, and only the
    tensors are used. Globals that torch's safe unpickler blocks outright (``os.system``, ``eval``,
    ``subprocess``...) still refuse the file. Every failure is a :class:`CheckpointError` naming the
    file (``FileNotFoundError`` for a missing one).

    A ``.safetensors`` file is read as such, and a diffusers model directory as its weights file
    (:data:`DIFFUSERS_WEIGHTS`; its ``config.json`` is the diffusers converter's to read)."""
    path = Path(path)
    if path.is_dir() and (weights := diffusers_weights_file(path)) is not None:
        path = weights
    if path.suffix == ".safetensors" and path.is_file():
        return _read_safetensors(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        raise CheckpointError(f"{path} is a diffusers pipeline, not one model: {_pipeline_hint(path)}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a save_pretrained directory is "
                              "exported already: load it with Tokenizer.from_pretrained)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as err:
        # foreign pickled classes are an UnpicklingError too, but only in a readable torch zip file
        if not (isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path)):
            raise unreadable_checkpoint(path, err) from None
    foreign: list[str] = []
    try:  # listing the globals needs the zip format (torch >= 1.6), which both projects' files use
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_inert_class(name), name) for name in foreign]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[-3:] if str(err) else [type(err).__name__]
        raise CheckpointError(f"{path} cannot be read safely (weights_only=True): {' '.join(r for r in reason if r)}. "
                              "If you trust the file, re-save its tensors with torch.save(ckpt['state_dict'] or "
                              "ckpt['model'], 'weights.pt') and convert that") from None
    log.warning("%s: ignored pickled objects of %d foreign class(es) (%s); only its tensors are used",
                path, len(foreign), ", ".join(foreign))
    return checkpoint

