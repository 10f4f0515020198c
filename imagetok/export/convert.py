"""Converters from other projects' checkpoints to an imagetok :class:`Tokenizer`.

- taming-transformers VQGAN (``VQModel`` Lightning checkpoints, ``state_dict`` with ``encoder.*``,
  ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv``, ``post_quant_conv``; ``loss.*`` ignored).
  Our CNN uses the same module names, so the conversion is the codebook's rename.
- LlamaGen VQ (``VQ_8`` / ``VQ_16``; ``{"model": state_dict}``): encoder/decoder ``conv_blocks[i].res/attn``
  and ``mid[0..2]``, attention only at the lowest resolution, an l2-normalised codebook.

Files are read with ``torch.load(weights_only=True)``; pickled non-tensor objects become inert placeholders.

The architecture (widths, levels, blocks, attention placement, codebook) is read from the tensors'
names and shapes, so any size of either family converts.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from imagetok.errors import CheckpointError, check
from imagetok.export.pretrained import key_mismatch_report
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _inert_class(qualified_name: str) -> type:
    """A placeholder class standing in for a pickled global we do not trust (a Lightning callback, an
    ``argparse.Namespace`` of training arguments): building it runs no code and keeps no state."""
    def _ignore(self, *args, **kwargs) -> None:
        return None

    return type(qualified_name.rsplit(".", 1)[-1], (), {"__init__": _ignore, "__setstate__": _ignore,
                                                         "__module__": "imagetok.export.convert.inert"})


def load_original_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read another project's checkpoint with ``torch.load(weights_only=True)``.

    Published checkpoints often pickle more than tensors (old Lightning checkpoints key their callback
    states by callback class, LlamaGen's training script saves its ``argparse.Namespace``). Those
    classes are replaced by inert placeholders, so their code is never imported or run, and only the
    tensors are used. Globals that torch's safe unpickler blocks outright (``os.system``, ``eval``,
    ``subprocess``...) still refuse the file. An unreadable or unsafe file raises :class:`CheckpointError`
    (one line on the command line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as err:  # not a torch file at all
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from None
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


def _architecture(state: dict[str, torch.Tensor], part: str) -> dict[str, Any]:
    """Encoder or decoder arguments implied by tensors in taming's layout (``encoder.down.i.block.j``,
    ``decoder.up.i.block.j``; level ``i`` at ``resolution / 2**i`` in both): the two are read
    separately, since LlamaGen's ``decoder_ch_mult`` may differ from its encoder's."""
    levels_key = "down" if part == "encoder" else "up"
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{part}.{levels_key}.")})
    check(levels == list(range(len(levels))) and len(levels) > 0, f"{part} levels", levels, "levels 0..n-1")
    widths = [state[f"{part}.{levels_key}.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    ch = state["encoder.conv_in.weight"].shape[0] if part == "encoder" else math.gcd(*widths)
    check(all(w % ch == 0 for w in widths), f"{part} widths", widths, f"multiples of the base width {ch}")
    blocks = len({k.split(".")[4] for k in state if k.startswith(f"{part}.{levels_key}.0.block.")})
    resolution = 256  # only places attention: expressed relative to it
    z_key, z_dim = ("encoder.conv_out.weight", 0) if part == "encoder" else ("decoder.conv_in.weight", 1)
    return {"ch": ch, "ch_mult": [w // ch for w in widths],
            "num_res_blocks": blocks if part == "encoder" else blocks - 1,
            "attn_resolutions": [resolution // 2**i for i in levels if f"{part}.{levels_key}.{i}.attn.0.q.weight" in state],
            "mid_attention": f"{part}.mid.attn_1.q.weight" in state,
            "z_channels": state[z_key].shape[z_dim], "resolution": resolution, "dropout": 0.0}


def _build(state: dict[str, torch.Tensor], l2_normalize: bool) -> Tokenizer:
    codebook = state["quantizer.codebook"]
    config = {
        "encoder": {"_target_": "imagetok.nets.cnn.Encoder", **_architecture(state, "encoder")},
        "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **_architecture(state, "decoder")},
        "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": codebook.shape[1],
                      "codebook_size": codebook.shape[0], "l2_normalize": l2_normalize},
    }
    tokenizer = Tokenizer.from_config(config)
    # our quantizer's training buffers (EMA statistics, usage) have no counterpart: they keep their defaults
    own = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("quantizer.") or k == "quantizer.codebook"}
    report = key_mismatch_report(own, state)
    if report:
        raise ValueError(f"the checkpoint does not fit the architecture its tensors imply ({config}):\n{report}")
    tokenizer.load_state_dict(state, strict=False)
    tokenizer.quantizer.initialized.fill_(True)
    return tokenizer.eval()


def convert_taming(checkpoint: dict[str, Any]) -> Tokenizer:
    """A taming-transformers VQGAN checkpoint (``{"state_dict": ...}`` or a bare state dict)."""
    state = checkpoint.get("state_dict", checkpoint)
    if "quantize.embedding.weight" not in state:
        raise ValueError("not a taming-transformers VQGAN checkpoint: no quantize.embedding.weight")
    # loss.* (discriminator, LPIPS) and quantizer buffers (index remapping) are not part of the tokenizer
    renamed = {("quantizer.codebook" if k == "quantize.embedding.weight" else k): v for k, v in state.items()
               if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")
               or k == "quantize.embedding.weight"}
    return _build(renamed, l2_normalize=False)


def _llamagen_key(key: str, num_levels: int) -> str | None:
    """LlamaGen name -> taming/imagetok name (``num_levels``: the decoder's), None for dropped buffers."""
    if key == "quantize.embedding.weight":
        return "quantizer.codebook"
    if key.startswith("quantize."):
        return None  # usage statistics
    key = re.sub(r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2.", key)
    key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    # LlamaGen's decoder lists levels lowest resolution first; ours (like taming) highest first
    match = re.match(r"^decoder\.conv_blocks\.(\d+)\.(res\.)?(.*)$", key)
    if match:
        level = num_levels - 1 - int(match.group(1))
        return f"decoder.up.{level}.{'block.' if match.group(2) else ''}{match.group(3)}"
    return key


def convert_llamagen(checkpoint: dict[str, Any]) -> Tokenizer:
    """A LlamaGen VQ checkpoint (``{"model": ...}``, ``{"ema": ...}`` preferred when present, or bare)."""
    state = checkpoint.get("ema") or checkpoint.get("model") or checkpoint
    if "quantize.embedding.weight" not in state or not any(k.startswith("encoder.conv_blocks.") for k in state):
        raise ValueError("not a LlamaGen VQ checkpoint: no quantize.embedding.weight / encoder.conv_blocks")
    num_levels = len({k.split(".")[2] for k in state if k.startswith("decoder.conv_blocks.")})
    renamed = {new: v for k, v in state.items() if (new := _llamagen_key(k, num_levels)) is not None}
    return _build(renamed, l2_normalize=True)


CONVERTERS = {"taming": convert_taming, "llamagen": convert_llamagen}
