"""LlamaGen VQ (``VQ_8`` / ``VQ_16``; Sun et al. 2024): taming's network under other names.

``{"model": state_dict}`` (``{"ema": ...}`` preferred when present) with encoder/decoder
``conv_blocks[i].res/attn`` and ``mid[0..2]``, the decoder's levels listed lowest resolution first,
and a codebook that is l2-normalised at lookup (stored raw).
"""

from __future__ import annotations

import re
from typing import Any

from imagetok.export.converters.registry import KeyLayout, register_key_layout
from imagetok.export.converters.vqgan_cnn import build_vqgan
from imagetok.tokenizer import Tokenizer

LAYOUT = KeyLayout(containers=("ema", "model"),
                   required=("quantize.embedding.weight", "encoder.conv_in.weight", "encoder.conv_blocks.",
                             "decoder.conv_blocks."))


def _taming_name(key: str, num_levels: int) -> str | None:
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
    """A LlamaGen VQ checkpoint (``{"ema": ...}``, ``{"model": ...}`` or bare) -> Tokenizer."""
    state = LAYOUT.state_of(checkpoint) or {}
    num_levels = len({k.split(".")[2] for k in state if k.startswith("decoder.conv_blocks.")})
    renamed = {new: v for k, v in state.items() if (new := _taming_name(k, num_levels)) is not None}
    return build_vqgan(renamed, l2_normalize=True)


register_key_layout("llamagen", LAYOUT, convert_llamagen)
