"""diffusers' ``VQModel`` (``models/autoencoders/vq_model.py``) -> a :class:`Tokenizer` on imagetok's CNN
nets (:mod:`imagetok.nets.cnn`) and the ``vq`` family, without diffusers installed.

diffusers publishes aMUSEd's VQ-GAN (Patil et al. 2024, https://arxiv.org/abs/2401.01808;
``amused/amused-256``, subfolder ``vqvae``) and Kandinsky 2.2 / 3's MoVQ (Zheng et al. 2022,
https://arxiv.org/abs/2209.09002; ``kandinsky-community/kandinsky-2-2-decoder``, subfolder ``movq``) as a
directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``).

Its nets are taming's VQGAN under other names: ``down_blocks.i.resnets.j`` (``conv_shortcut`` for the
1x1 skip), ``attentions.j`` with linear ``to_q/to_k/to_v/to_out.0`` (or the older ``query/key/value/
proj_attn``; 1x1 convs here, one head), ``downsamplers.0.conv`` (stride 2 after right/bottom zero padding),
``upsamplers.0.conv`` (after nearest x2), ``mid_block.resnets.0/1`` around ``attentions.0``; the decoder's
``up_blocks`` are listed lowest resolution first. Every residual sum has ``output_scale_factor`` 1.
What the shapes do not tell comes from ``config.json``: ``norm_num_groups`` (every GroupNorm's groups)
and ``act_fn``. With ``norm_type="spatial"`` (MoVQ) every decoder norm is a SpatialNorm (32 groups,
whatever ``norm_num_groups`` says) conditioned on the quantized latent before ``post_quant_conv``:
imagetok's ``Decoder(condition_channels=...)``.

diffusers' ``VQModel`` has no notion of pixel range; its pipelines do. aMUSEd's works on [0, 1] images
(its image processor does not normalise, its decode is clipped to [0, 1]); Kandinsky's MoVQ and the LDM
VQ models on [-1, 1], imagetok's range. The nets' ``pixel_range`` maps between the two, chosen by the
``pixel_range`` option or, by default, from the pipeline's ``model_index.json`` one directory up
(``AmusedPipeline`` & co.: [0, 1]; anything else or none: [-1, 1]).

``VQModel.encode`` returns the latent before quantization; ``decode(h)`` quantizes it with the legacy
``VectorQuantizer`` (``cdist`` nearest code, no normalisation). So ``tok.encode`` gives the indices that
quantizer picks and ``tok.decode(indices)`` the image diffusers decodes from those codes. Not used, as
they do not change tokens or images in float32: ``scaling_factor`` (latent scale for a diffusion
model), ``lookup_from_codebook`` (whether ``decode(..., force_not_quantize=True)`` takes indices),
``force_upcast`` (float16 pipelines), ``sample_size``. Fine-tuning uses imagetok's VQ loss
(``beta`` on the commitment term), not the swapped weights of diffusers' ``legacy=True``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from imagetok.errors import CheckpointError
from imagetok.export.converters.registry import KeyLayout, SourceFormat, register
from imagetok.export.converters.weights import load_converted_weights
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LAYOUT = KeyLayout(containers=(), required=("encoder.conv_in.weight", "encoder.down_blocks.", "decoder.up_blocks.",
                                            "quantize.embedding.weight"))
DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm: fixed, not norm_num_groups
# the values config.json may hold that imagetok's nets can match (a list: any of these)
SUPPORTED = {"act_fn": ("silu", "swish"), "norm_type": ("group", "spatial"), "_class_name": ("VQModel",)}


def looks_like_diffusers_vq(checkpoint: Any, config: Any = None, checkpoint_path: Path | None = None,
                            pixel_range: Any = None) -> bool:
    """Whether ``checkpoint`` holds a diffusers ``VQModel``'s tensors, from their names alone."""
    return LAYOUT.matches(checkpoint)


def read_model_config(config: str | Path | dict | None, checkpoint_path: Path | None) -> dict[str, Any]:
    """The ``VQModel`` config: ``config`` (a dict or a ``config.json`` path), else the ``config.json``
    of the model directory (``checkpoint_path`` or the directory of that weights file), else ``{}``
    (diffusers' defaults: 32 groups, SiLU)."""
    if isinstance(config, dict):
        return config
    path = Path(config) if config is not None else None
    if path is None and checkpoint_path is not None:
        directory = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
        path = directory / "config.json" if (directory / "config.json").is_file() else None
    if path is None:
        log.warning("no config.json next to the diffusers weights: using VQModel's defaults "
                    "(norm_num_groups=32, act_fn='silu'); pass config=<config.json> otherwise")
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        loaded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} is not a diffusers model config (a JSON object)")
    return loaded


def choose_pixel_range(pixel_range: Any, checkpoint_path: Path | None) -> list[float]:
    """``pixel_range`` ([low, high]) if given, else [0, 1] for a ``vqvae`` of an aMUSEd pipeline (its
    ``model_index.json`` one directory up), else [-1, 1]."""
    if pixel_range is not None:
        values = list(pixel_range) if isinstance(pixel_range, (list, tuple)) else None
        if values not in ([0, 1], [-1, 1]):
            raise CheckpointError(f"pixel_range={pixel_range!r} is invalid: allowed values are [0,1] (aMUSEd) or "
                                  "[-1,1] (MoVQ, LDM), or null (from the pipeline's model_index.json)")
        return [float(v) for v in values]
    if checkpoint_path is not None:
        directory = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
        index = directory.parent / "model_index.json"
        try:
            pipeline = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pipeline = ""
        if str(pipeline).startswith("Amused"):
            log.info("%s belongs to an %s: its VQ-GAN works on [0, 1] images (pixel_range=[0,1])", directory, pipeline)
            return [0.0, 1.0]
    return [-1.0, 1.0]


def _check_supported(cfg: dict[str, Any]) -> None:
    """One line naming the first config value imagetok's nets cannot reproduce."""
    for key, allowed in SUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(f"config.json {key}={cfg[key]!r} is not supported: imagetok converts {', '.join(map(repr, allowed))}")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        bad = [t for t in cfg.get(key) or () if t not in allowed]
        if bad:
            raise CheckpointError(f"config.json {key} has {bad[0]!r}, which is not supported: VQModel's nets "
                                  f"use {' or '.join(allowed)}")


def _levels(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith(prefix) and k.split(".")[2].isdigit()})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"levels {levels} under {prefix}*: expected 0..n-1")
    return levels


def _tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"no tensor {key}, which the {key.split('.')[0]} needs")
    return state[key]


def _architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensors imply: widths, blocks per level, attention, latent / code sizes, spatial norms."""
    levels = _levels(state, "encoder.down_blocks.")
    n = len(levels)
    widths = [_tensor(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight").shape[0] for i in levels]
    if len(_levels(state, "decoder.up_blocks.")) != n:
        raise CheckpointError(f"the encoder has {n} levels (encoder.down_blocks.*), the decoder a different number")
    blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
    codebook = _tensor(state, "quantize.embedding.weight")
    if codebook.ndim != 2:
        raise CheckpointError(f"quantize.embedding.weight has shape {tuple(codebook.shape)}: expected [codes, dim]")
    return {
        "block_out_channels": widths, "layers_per_block": blocks,
        "in_channels": _tensor(state, "encoder.conv_in.weight").shape[1],
        "out_channels": _tensor(state, "decoder.conv_out.weight").shape[0],
        "latent_channels": _tensor(state, "encoder.conv_out.weight").shape[0],
        "vq_embed_dim": codebook.shape[1], "num_vq_embeddings": codebook.shape[0],
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.0.") for k in state),
        "norm_type": "spatial" if "decoder.conv_norm_out.conv_y.weight" in state else "group",
        # attention per level, level i at resolution / 2**i (the decoder lists its levels the other way)
        "encoder_attention": [any(k.startswith(f"encoder.down_blocks.{i}.attentions.") for k in state) for i in levels],
        "decoder_attention": [any(k.startswith(f"decoder.up_blocks.{n - 1 - i}.attentions.") for k in state) for i in levels],
    }


def _check_config(cfg: dict[str, Any], implied: dict[str, Any]) -> None:
    """Each value config.json states that the tensors also tell must agree with them."""
    for key in ("block_out_channels", "layers_per_block", "in_channels", "out_channels", "latent_channels",
                "num_vq_embeddings", "mid_block_add_attention", "norm_type"):
        given = cfg.get(key)
        if given is not None and (list(given) if isinstance(given, (list, tuple)) else given) != implied[key]:
            raise CheckpointError(f"config.json {key}={given!r} does not fit the tensors ({implied[key]!r})")
    if cfg.get("vq_embed_dim") not in (None, implied["vq_embed_dim"]):
        raise CheckpointError(f"config.json vq_embed_dim={cfg['vq_embed_dim']!r} does not fit the tensors "
                              f"({implied['vq_embed_dim']!r})")
    for key, attention in (("down_block_types", implied["encoder_attention"]),
                           ("up_block_types", implied["decoder_attention"][::-1])):
        given = cfg.get(key)
        if given is not None and [t.startswith("Attn") for t in given] != attention:
            raise CheckpointError(f"config.json {key}={list(given)!r} does not fit the tensors' attention "
                                  f"per block ({attention!r})")


def _imagetok_name(key: str, num_levels: int) -> str | None:
    """diffusers ``VQModel`` name -> imagetok's (taming's) name."""
    if key == "quantize.embedding.weight":
        return "quantizer.codebook"
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    match = re.match(r"^decoder\.up_blocks\.(\d+)\.(.*)$", key)
    if match:  # diffusers lists the decoder's levels lowest resolution first; ours (taming's) highest first
        key = f"decoder.up.{num_levels - 1 - int(match.group(1))}.{match.group(2)}"
    key = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", key)
    key = re.sub(r"\.attentions\.(\d+)\.", r".attn.\1.", key)
    key = re.sub(r"\.(downsample|upsample)rs\.0\.conv\.", r".\1.conv.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    key = re.sub(r"\.(group_norm|spatial_norm)\.", ".norm.", key)
    key = re.sub(r"\.(to_q|query)\.", ".q.", key)
    key = re.sub(r"\.(to_k|key)\.", ".k.", key)
    key = re.sub(r"\.(to_v|value)\.", ".v.", key)
    return re.sub(r"\.(to_out\.0|proj_attn)\.", ".proj_out.", key)


def _renamed(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _imagetok_name(key, num_levels)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]  # a linear layer over channels is a 1x1 conv
        out[new] = value
    return out


def convert_diffusers(checkpoint: dict[str, torch.Tensor], *, config: str | Path | dict | None = None,
                      checkpoint_path: Path | None = None, pixel_range: Any = None) -> Tokenizer:
    """A diffusers ``VQModel`` state dict -> :class:`Tokenizer` (eval mode): ``encode`` ``[B, 3, H, W]`` in
    [-1, 1] -> indices ``[B, H/f, W/f, 1]`` (``f = 2**(levels - 1)``) as ``VQModel``'s quantizer picks them,
    ``decode`` -> the unclamped image ``VQModel.decode`` makes from those codes.

    Args:
        checkpoint: the tensors of ``diffusion_pytorch_model.safetensors`` (or ``.bin``).
        config: the model's ``config.json`` (path or dict); default: the one in ``checkpoint_path``'s
            directory, else diffusers' defaults.
        checkpoint_path: the model directory or weights file the tensors came from.
        pixel_range: the range the VQModel's images are in, ``[0, 1]`` or ``[-1, 1]``; default: see
            :func:`choose_pixel_range`. Our ``encode`` / ``decode`` stay on imagetok's [-1, 1].

    Raises:
        CheckpointError: not a ``VQModel``, a config value imagetok cannot match (named), or tensors
            that do not fit one architecture.
    """
    if not looks_like_diffusers_vq(checkpoint):
        raise CheckpointError(f"not a diffusers VQModel: expected {LAYOUT.describe()}")
    cfg = read_model_config(config, checkpoint_path)
    _check_supported(cfg)
    pixels = choose_pixel_range(pixel_range, checkpoint_path)
    ranges = {} if pixels == [-1.0, 1.0] else {"pixel_range": pixels}
    arch = _architecture(checkpoint)
    _check_config(cfg, arch)
    widths, n = arch["block_out_channels"], len(arch["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise CheckpointError(f"block_out_channels={widths} is not supported: imagetok's nets need every width a "
                              f"multiple of the first ({widths[0]})")
    spatial = arch["norm_type"] == "spatial"
    if spatial and arch["vq_embed_dim"] != arch["latent_channels"]:
        raise CheckpointError(f"norm_type='spatial' with vq_embed_dim={arch['vq_embed_dim']} != latent_channels="
                              f"{arch['latent_channels']} is not supported (VQModel's own spatial norms cannot run it)")
    groups = cfg.get("norm_num_groups", 32)
    if not (isinstance(groups, int) and groups >= 1 and all(w % groups == 0 for w in widths)):
        raise CheckpointError(f"config.json norm_num_groups={groups!r} does not divide every width {widths}")
    resolution = max(256, 2 ** (n - 1))  # only places attention: level i is at resolution / 2**i
    common = {"ch": widths[0], "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": arch["layers_per_block"],
              "z_channels": arch["latent_channels"], "resolution": resolution, "dropout": 0.0,
              "mid_attention": arch["mid_block_add_attention"]}

    def attention(flags: list[bool]) -> list[int]:
        return [resolution // 2**i for i, on in enumerate(flags) if on]

    tok_config = {
        "encoder": {"_target_": "imagetok.nets.cnn.Encoder", "in_channels": arch["in_channels"], **common,
                    "attn_resolutions": attention(arch["encoder_attention"]), "norm_groups": groups, **ranges},
        "decoder": {"_target_": "imagetok.nets.cnn.Decoder", "out_channels": arch["out_channels"], **common,
                    "attn_resolutions": attention(arch["decoder_attention"]),
                    "norm_groups": SPATIAL_NORM_GROUPS if spatial else groups,
                    "condition_channels": arch["vq_embed_dim"] if spatial else None, **ranges},
        "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": arch["vq_embed_dim"],
                      "codebook_size": arch["num_vq_embeddings"], "beta": 0.25, "l2_normalize": False},
    }
    try:
        tokenizer = Tokenizer.from_config(tok_config)
    except ValueError as err:
        raise CheckpointError(f"the tensors imply an architecture imagetok cannot build: {' '.join(str(err).split())}") from None
    state = _renamed(checkpoint, n)
    return load_converted_weights(tokenizer, state, "the VQModel")


register(SourceFormat("diffusers", f"a diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors) "
                                   f"or its weights file, with {', '.join(k + '*' if k.endswith('.') else k for k in LAYOUT.required)}",
                      looks_like_diffusers_vq, convert_diffusers, options=("config", "checkpoint_path", "pixel_range")))
