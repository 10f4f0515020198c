"""The CNN VQGAN that taming-transformers introduced and LlamaGen renamed, built from a state dict in
taming's names (which imagetok's ``nets/cnn.py`` shares), with the architecture read from the tensors.

Widths, levels, blocks per level, attention placement and the codebook are all implied by the names
and shapes, so any size of either family converts; a state dict that does not imply a buildable
architecture is a :class:`CheckpointError` naming what is missing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imagetok.errors import CheckpointError
from imagetok.export.converters.weights import load_converted_weights
from imagetok.tokenizer import Tokenizer


def _tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"no tensor {key}, which the {key.split('.')[0]} needs")
    return state[key]


def _architecture(state: dict[str, torch.Tensor], part: str) -> dict[str, Any]:
    """Encoder or decoder arguments implied by tensors in taming's layout (``encoder.down.i.block.j``,
    ``decoder.up.i.block.j``; level ``i`` at ``resolution / 2**i`` in both): the two are read
    separately, since LlamaGen's ``decoder_ch_mult`` may differ from its encoder's."""
    levels_key = "down" if part == "encoder" else "up"
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{part}.{levels_key}.") and k.split(".")[2].isdigit()})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{part} levels {levels} under {part}.{levels_key}.*: expected levels 0..n-1")
    widths = [_tensor(state, f"{part}.{levels_key}.{i}.block.0.conv1.weight").shape[0] for i in levels]
    ch = _tensor(state, "encoder.conv_in.weight").shape[0] if part == "encoder" else math.gcd(*widths)
    if any(w % ch for w in widths):
        raise CheckpointError(f"{part} widths {widths} are not multiples of the base width {ch}")
    blocks = len({k.split(".")[4] for k in state if k.startswith(f"{part}.{levels_key}.0.block.")})
    resolution = 256  # only places attention: expressed relative to it
    z_key, z_dim = ("encoder.conv_out.weight", 0) if part == "encoder" else ("decoder.conv_in.weight", 1)
    return {"ch": ch, "ch_mult": [w // ch for w in widths],
            "num_res_blocks": blocks if part == "encoder" else blocks - 1,
            "attn_resolutions": [resolution // 2**i for i in levels if f"{part}.{levels_key}.{i}.attn.0.q.weight" in state],
            "mid_attention": f"{part}.mid.attn_1.q.weight" in state,
            "z_channels": _tensor(state, z_key).shape[z_dim], "resolution": resolution, "dropout": 0.0}


def build_vqgan(state: dict[str, torch.Tensor], l2_normalize: bool) -> Tokenizer:
    """A :class:`Tokenizer` (eval mode) holding ``state``: tensors in taming's names, with the codebook
    ``[K, D]`` renamed ``quantizer.codebook``; ``l2_normalize``: whether codes and latents are compared
    on the unit sphere (LlamaGen) or as they are (taming)."""
    codebook = _tensor(state, "quantizer.codebook")
    if codebook.ndim != 2:
        raise CheckpointError(f"the codebook has shape {tuple(codebook.shape)}: expected [codes, dim]")
    config = {
        "encoder": {"_target_": "imagetok.nets.cnn.Encoder", **_architecture(state, "encoder")},
        "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **_architecture(state, "decoder")},
        "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": codebook.shape[1],
                      "codebook_size": codebook.shape[0], "l2_normalize": l2_normalize},
    }
    try:
        tokenizer = Tokenizer.from_config(config)
    except ValueError as err:  # e.g. a width GroupNorm's 32 groups do not divide
        raise CheckpointError(f"the tensors imply an architecture imagetok cannot build ({config}): {err}") from None
    return load_converted_weights(tokenizer, state, "the checkpoint")
