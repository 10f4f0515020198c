"""FoundationVision VAR's multi-scale VQVAE (``vae_ch160v4096z32.pth``; Tian et al. 2024) -> a
:class:`Tokenizer` on the ``var`` family (:class:`~imagetok.quantizers.multiscale.MultiScaleResidualQuantizer`).

VAR releases a bare ``state_dict`` of its ``models/vqvae.py`` ``VQVAE``:

- ``encoder.*`` / ``decoder.*``: the taming/LDM CNN under taming's names, except that attention keeps
  q, k and v in one 1x1 conv ``attn.qkv`` (``[3C, C, 1, 1]``, q first); it is split into our ``q/k/v``
  (the same products, so the same maths). Attention sits in every block of the lowest-resolution
  level and in the middle (``using_sa``, ``using_mid_sa``), GroupNorm 32, eps 1e-6.
- ``quant_conv`` / ``post_quant_conv``: 3x3 convs (``quant_conv_ks=3``) on the ``Cvae``-channel latents.
- ``quantize.embedding.weight`` ``[V, Cvae]``: one codebook for all scales, plain l2 nearest code
  (``using_znorm=False``: the default, which ``build_vae_var`` keeps for the release).
- ``quantize.quant_resi.*``: the refinement convs phi, stored as ``qresi_ls.{j}`` (partially shared,
  ``share_quant_resi=n >= 2``; the release has 4), ``{j}`` (one per scale, ``share_quant_resi=0``) or
  ``qresi`` (one for all, ``share_quant_resi=1``). Our ``refiner_of_scale`` reproduces VAR's tick rule
  for all three, so they become ``quantizer.refiners.{j}`` with ``num_refiners`` = their count.
- ``quantize.ema_vocab_hit_SV`` ``[scales, V]``: training statistics, dropped; its rows say how many scales.

Not stored in the file, so taken from VAR's defaults (override with the keyword arguments of
:func:`convert_var`): the scale schedule ``v_patch_nums = 1, 2, 3, 4, 5, 6, 8, 10, 13, 16`` (680 tokens
at 256x256, the last scale equals the 16x16 latent) and the refinement ratio ``quant_resi = 0.5``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from imagetok.errors import CheckpointError
from imagetok.export.converters.registry import SourceFormat, register
from imagetok.export.converters.vqgan_cnn import _architecture
from imagetok.export.converters.weights import load_converted_weights
from imagetok.tokenizer import Tokenizer

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_REFINE_RATIO = 0.5
_CODEBOOK, _HITS, _PHI = "quantize.embedding.weight", "quantize.ema_vocab_hit_SV", "quantize.quant_resi."


def _state_of(checkpoint: Any) -> dict[str, Any] | None:
    """The state dict in ``checkpoint``: VAR's release is bare; ``{"state_dict"|"model": ...}`` also read."""
    if not isinstance(checkpoint, dict):
        return None
    for name in ("state_dict", "model"):
        if isinstance(checkpoint.get(name), dict):
            return checkpoint[name]
    return checkpoint


def looks_like_var(checkpoint: dict) -> bool:
    """Whether ``checkpoint`` holds VAR's VQVAE, from its entries' names alone: taming's encoder names plus
    the multi-scale quantizer's phi convs or hit statistics (a taming or LlamaGen file has neither)."""
    state = _state_of(checkpoint)
    if state is None:
        return False
    keys = [k for k in state if isinstance(k, str)]
    return (_CODEBOOK in state and "encoder.conv_in.weight" in state and any(k.startswith("encoder.down.") for k in keys)
            and (_HITS in state or any(k.startswith(_PHI) for k in keys)))


def _split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...attn.qkv.{weight,bias}`` (q, k, v stacked on the output channels) -> ``...attn.{q,k,v}.*``."""
    out = {}
    for key, value in state.items():
        match = re.match(r"^(.*)\.qkv\.(weight|bias)$", key)
        if match is None:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise CheckpointError(f"{key} has {value.shape[0]} output channels: expected 3 x channels (q, k, v)")
        for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
            out[f"{match.group(1)}.{name}.{match.group(2)}"] = part.clone()
    return out


def _refiners(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAR's phi convs under any of its three sharing layouts -> ``quantizer.refiners.{j}.*``."""
    out = {}
    for key, value in state.items():
        if not key.startswith(_PHI):
            continue
        rest = key[len(_PHI):]
        match = re.match(r"^(?:qresi_ls\.)?(\d+)\.(weight|bias)$", rest) or re.match(r"^qresi\.()(weight|bias)$", rest)
        if match is None:
            raise CheckpointError(f"unexpected quantizer tensor {key}: expected quant_resi.qresi_ls.<j>, "
                                  "quant_resi.<j> or quant_resi.qresi (VAR's phi convs)")
        out[f"quantizer.refiners.{match.group(1) or 0}.{match.group(2)}"] = value
    numbers = sorted({int(k.split(".")[2]) for k in out})
    if numbers != list(range(len(numbers))):
        raise CheckpointError(f"VAR's phi convs are numbered {numbers}: expected 0..n-1")
    return out


def _scales(state: dict[str, torch.Tensor], scales: Sequence[int] | None) -> list[int]:
    """The scale schedule: ``scales`` if given, else VAR's published one; checked against the number of
    scales the hit statistics were kept for."""
    chosen = list(scales) if scales is not None else list(VAR_SCALES)
    hits = state.get(_HITS)
    if hits is not None and hits.ndim == 2 and hits.shape[0] != len(chosen):
        raise CheckpointError(f"the checkpoint was trained with {hits.shape[0]} scales ({_HITS} has {hits.shape[0]} rows), "
                              f"not the {len(chosen)} of {chosen}: VAR does not store its v_patch_nums, pass them as "
                              "convert_var(checkpoint, scales=[...])")
    return chosen


def convert_var(checkpoint: dict, *, scales: Sequence[int] | None = None,
                refine_ratio: float = VAR_REFINE_RATIO) -> Tokenizer:
    """VAR's VQVAE state dict -> :class:`Tokenizer` in eval mode whose ``encode`` gives VAR's
    ``img_to_idxBl`` indices concatenated coarse to fine (``[B, sum(s^2), 1]``) and whose ``decode`` is
    VAR's ``idxBl_to_img(..., same_shape=True, last_one=True)`` without the final ``clamp(-1, 1)``.

    Args:
        checkpoint: the loaded ``.pth`` (bare state dict, or wrapped in ``state_dict`` / ``model``).
        scales: token-map sides coarse to fine (VAR's ``v_patch_nums``); the last one must be the latent
            side (image size / 16 for VAR's CNN). Default: VAR's 10 scales for 256x256.
        refine_ratio: VAR's ``quant_resi`` (phi(x) = (1 - r) x + r conv(x)); default 0.5 as released.

    Raises:
        CheckpointError: the checkpoint is not VAR's VQVAE or its tensors do not fit one architecture.
    """
    if not looks_like_var(checkpoint):
        raise CheckpointError("not a VAR VQVAE checkpoint: expected a state dict with encoder.conv_in.weight, "
                              f"encoder.down.*, {_CODEBOOK} and {_PHI}* or {_HITS}")
    state = _state_of(checkpoint)
    codebook = state[_CODEBOOK]
    if codebook.ndim != 2:
        raise CheckpointError(f"{_CODEBOOK} has shape {tuple(codebook.shape)}: expected [codes, channels]")
    renamed = _split_qkv({k: v for k, v in state.items() if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")})
    renamed.update(_refiners(state))
    renamed["quantizer.vq.codebook"] = codebook
    if "quant_conv.weight" not in renamed or "post_quant_conv.weight" not in renamed:
        raise CheckpointError("not a VAR VQVAE checkpoint: no quant_conv.weight / post_quant_conv.weight")
    num_refiners = len({k.split(".")[2] for k in renamed if k.startswith("quantizer.refiners.")})
    try:
        config = {
            "encoder": {"_target_": "imagetok.nets.cnn.Encoder", **_architecture(renamed, "encoder")},
            "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **_architecture(renamed, "decoder")},
            "quantizer": {"_target_": "imagetok.quantizers.multiscale.MultiScaleResidualQuantizer",
                          "dim": codebook.shape[1], "codebook_size": codebook.shape[0], "scales": _scales(state, scales),
                          "num_refiners": num_refiners, "refine_ratio": float(refine_ratio), "upsample": "bicubic"},
            "quant_conv_kernel_size": renamed["quant_conv.weight"].shape[-1],
        }
        tokenizer = Tokenizer.from_config(config)
    except (KeyError, ValueError) as err:  # a missing tensor, or values no imagetok net accepts
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"the VAR checkpoint's tensors imply no architecture imagetok can build: {err}") from None
    load_converted_weights(tokenizer, renamed, "the VAR checkpoint", codebook="quantizer.vq.codebook")
    return tokenizer.eval()


# taming's encoder/decoder names plus either quantizer entry: not a KeyLayout (which needs all of its names)
register(SourceFormat("var", f'{{"state_dict": ...}} or {{"model": ...}} or a bare state dict with {_CODEBOOK}, '
                             f"encoder.conv_in.weight, encoder.down.*, and {_PHI}* or {_HITS}",
                      looks_like_var, convert_var))
