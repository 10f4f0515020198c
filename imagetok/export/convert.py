"""Converters from other projects' checkpoints to an imagetok :class:`Tokenizer`.

- taming-transformers VQGAN (``VQModel`` Lightning checkpoints, ``state_dict`` with ``encoder.*``,
  ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv``, ``post_quant_conv``; ``loss.*`` ignored).
  Our CNN uses the same module names, so the conversion is the codebook's rename.
- LlamaGen VQ (``VQ_8`` / ``VQ_16``; ``{"model": state_dict}``): encoder/decoder ``conv_blocks[i].res/attn``
  and ``mid[0..2]``, attention only at the lowest resolution, an l2-normalised codebook.

The architecture (widths, levels, blocks, attention placement, codebook) is read from the tensors'
names and shapes, so any size of either family converts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from imagetok.tokenizer import Tokenizer

_LEVEL = re.compile(r"^encoder\.(?:down|conv_blocks)\.(\d+)\.")


def load_original_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: a checkpoint that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends
        raise ValueError(f"{path} cannot be read with weights_only=True ({type(err).__name__}); re-save its state "
                         "dict with torch.save(ckpt['state_dict'] or ckpt['model'], 'weights.pt') and convert that") from None


def _architecture(state: dict[str, torch.Tensor], block: str, attn_key: str) -> dict[str, Any]:
    levels = sorted({int(m.group(1)) for k in state if (m := _LEVEL.match(k))})
    ch = state["encoder.conv_in.weight"].shape[0]
    ch_mult = [state[f"encoder.{block}.{i}.{'block' if block == 'down' else 'res'}.0.conv1.weight"].shape[0] // ch
               for i in levels]
    inner = "block" if block == "down" else "res"
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith(f"encoder.{block}.0.{inner}.")})
    attention_levels = [i for i in levels if f"encoder.{block}.{i}.{attn_key}.0.q.weight" in state]
    resolution = 256  # only places attention: expressed relative to it
    return {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks,
            "attn_resolutions": [resolution // 2**i for i in attention_levels],
            "z_channels": state["encoder.conv_out.weight"].shape[0], "resolution": resolution, "dropout": 0.0}


def _build(state: dict[str, torch.Tensor], arch: dict[str, Any], l2_normalize: bool) -> Tokenizer:
    codebook = state["quantizer.codebook"]
    config = {
        "encoder": {"_target_": "imagetok.nets.cnn.Encoder", **arch},
        "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **arch},
        "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": codebook.shape[1],
                      "codebook_size": codebook.shape[0], "l2_normalize": l2_normalize},
    }
    tokenizer = Tokenizer.from_config(config)
    own = tokenizer.state_dict()
    weights = {k: v for k, v in state.items() if k in own}
    missing = sorted(k for k in own if k not in weights and (not k.startswith("quantizer.") or k == "quantizer.codebook"))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) of the architecture it implies, e.g. {missing[:5]}")
    tokenizer.load_state_dict(weights, strict=False)  # quantizer buffers (EMA statistics) keep their defaults
    tokenizer.quantizer.initialized.fill_(True)
    return tokenizer.eval()


def convert_taming(checkpoint: dict[str, Any]) -> Tokenizer:
    """A taming-transformers VQGAN checkpoint (``{"state_dict": ...}`` or a bare state dict)."""
    state = checkpoint.get("state_dict", checkpoint)
    if "quantize.embedding.weight" not in state:
        raise ValueError("not a taming-transformers VQGAN checkpoint: no quantize.embedding.weight")
    renamed = {("quantizer.codebook" if k == "quantize.embedding.weight" else k): v for k, v in state.items()
               if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize")}
    return _build(renamed, _architecture(renamed, "down", "attn"), l2_normalize=False)


def _llamagen_key(key: str, num_levels: int) -> str | None:
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
    num_levels = len({k.split(".")[2] for k in state if k.startswith("encoder.conv_blocks.")})
    renamed = {new: v for k, v in state.items() if (new := _llamagen_key(k, num_levels)) is not None}
    return _build(renamed, _architecture(renamed, "down", "attn"), l2_normalize=True)


CONVERTERS = {"taming": convert_taming, "llamagen": convert_llamagen}
