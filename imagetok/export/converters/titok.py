"""bytedance/1d-tokenizer TiTok checkpoints (Yu et al. 2024, https://arxiv.org/abs/2406.07550) -> a
:class:`Tokenizer` on :mod:`imagetok.nets.titok` and the ``vq`` family.

The releases (``tokenizer_titok_{l32,b64,s128}.bin``, ``tokenizer_titok_{bl64,bl128,sl256}_vq8k.bin``, and the
Hub repos ``yucornetto/tokenizer_titok_*`` as ``model.safetensors`` / ``pytorch_model.bin`` of the
``TiTok`` module) are bare state dicts:

- ``latent_tokens``, ``encoder.*``: the ViT encoder (``patch_embed``, ``class_embedding``,
  ``positional_embedding``, ``latent_token_positional_embedding``, ``ln_pre``, ``transformer.{i}``
  with ``nn.MultiheadAttention``, ``ln_post``, 1x1 ``conv_out``) -> :class:`~imagetok.nets.titok.TiTokEncoder`;
  ``in_proj_*`` is q, k, v stacked as our ``qkv``, so blocks are a rename.
- ``quantize.embedding.weight`` ``[K, token_size]``: VQ with l2-normalised latents and codes
  (``use_l2_norm``) -> ``VectorQuantizer(l2_normalize=...)``; identity ``quant_conv``s.
- ``decoder.*`` with ``ffn.0 / ffn.2`` (``is_legacy``, the VQ-4096 releases): logits over MaskGIT-VQGAN's
  1024 codes, softly embedded through ``pixel_quantize.embedding.weight`` and decoded by
  ``pixel_decoder.*`` -> :class:`~imagetok.nets.proxy_codes.ProxyCodeDecoder` over
  :class:`~imagetok.nets.maskgit_vqgan.MaskGitDecoder`. With ``ffn.0`` to pixels and ``conv_out``
  (the VQ-8k releases): a pixel head.

The architecture comes from the tensors' names and shapes; TiTok's heads are 64 wide in every size
(S/B/L: 8/12/16 heads), so ``num_heads = width / 64``. Not in the tensors: ``use_l2_norm`` (taken
from the release that has this decoder: on for the proxy-code decoder, off for the pixel head) and
``is_legacy`` (the original code sets encoder and decoder together, so the decoder's head tells);
``config=`` (the Hub's ``config.json`` or the repo's yaml) states both and is checked against the tensors.
TiTok works on images in [0, 1]; the nets' ``unit_interval`` maps imagetok's [-1, 1] in and out.

Refused, one line each: the VAE variants (continuous tokens), a stage-1 checkpoint (proxy-code logits
without the MaskGIT decoder), TA-TiTok (a text-conditioned decoder).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from imagetok.errors import CheckpointError
from imagetok.export.converters.registry import KeyLayout, SourceFormat, register
from imagetok.export.converters.weights import load_converted_weights
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LAYOUT = KeyLayout(containers=("state_dict", "model"),
                   required=("latent_tokens", "encoder.patch_embed.weight", "encoder.latent_token_positional_embedding",
                             "decoder.latent_token_positional_embedding"))
HEAD_DIM = 64  # TiTok's small/base/large: 512/8, 768/12, 1024/16
MODEL_WIDTHS = {"small": 512, "base": 768, "large": 1024}  # vit_{enc,dec}_model_size
_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
          "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}


def _tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"not a complete TiTok checkpoint: it lacks the tensor {key}")
    return state[key]


def _vit(state: dict[str, torch.Tensor], part: str, resolution: int | None = None) -> dict[str, Any]:
    """Transformer arguments of ``encoder`` or ``decoder`` implied by their tensors."""
    blocks = sorted({int(k.split(".")[2]) for k in state if re.match(rf"^{part}\.transformer\.\d+\.", k)})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{part} transformer blocks {blocks}: expected {part}.transformer.0..n-1")
    width = _tensor(state, f"{part}.ln_pre.weight").shape[0]
    if width % HEAD_DIM:
        raise CheckpointError(f"the {part} is {width} wide: TiTok's heads are {HEAD_DIM} wide, so widths are multiples of it")
    patches = _tensor(state, f"{part}.positional_embedding").shape[0] - 1
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(f"{part}.positional_embedding holds {patches} patch positions: not a square grid")
    if part == "encoder":
        patch_size = _tensor(state, "encoder.patch_embed.weight").shape[-1]
        resolution = grid * patch_size
    elif resolution % grid:
        raise CheckpointError(f"the decoder's {grid}x{grid} grid does not divide the encoder's {resolution}x{resolution} images")
    hidden = _tensor(state, f"{part}.transformer.0.mlp.c_fc.weight").shape[0]
    return {"patch_size": resolution // grid, "width": width, "depth": len(blocks), "num_heads": width // HEAD_DIM,
            "mlp_ratio": hidden / width, "resolution": resolution,
            "num_latent_tokens": _tensor(state, f"{part}.latent_token_positional_embedding").shape[0],
            "unit_interval": True}


def _pixel_decoder(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """:class:`MaskGitDecoder` arguments implied by ``pixel_decoder.up.{i}.block.{j}`` tensors."""
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("pixel_decoder.up.")})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"pixel_decoder levels {levels}: expected pixel_decoder.up.0..n-1")
    widths = [_tensor(state, f"pixel_decoder.up.{i}.block.0.conv1.weight").shape[0] for i in levels]
    ch = math.gcd(*widths)
    blocks = len({k.split(".")[4] for k in state if k.startswith("pixel_decoder.up.0.block.")})
    return {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitDecoder", "ch": ch, "ch_mult": [w // ch for w in widths],
            "num_res_blocks": blocks, "z_channels": _tensor(state, "pixel_decoder.conv_in.weight").shape[1],
            "unit_interval": True}


def _vq_model(config: dict[str, Any] | None) -> dict[str, Any]:
    """``model.vq_model`` of a TiTok config (the Hub's ``config.json`` or the repo's yaml), or {}."""
    if not config:
        return {}
    vq = (config.get("model") or {}).get("vq_model")
    if not isinstance(vq, dict):
        raise CheckpointError("the config is not a TiTok config: no model.vq_model")
    return vq


def _refuse_variants(state: dict[str, torch.Tensor], vq: dict[str, Any]) -> None:
    if any(k.startswith("decoder.text_guidance") for k in state):
        raise CheckpointError("a TA-TiTok checkpoint (decoder.text_guidance_*: the decoder is conditioned on text) "
                              "is not supported: only TiTok's image-only tokenizers")
    if vq.get("quantize_mode", "vq") == "vae" or "quantize.embedding.weight" not in state:
        raise CheckpointError("a TiTok VAE checkpoint (quantize_mode: vae, no quantize.embedding.weight) has "
                              "continuous tokens, not discrete ones: imagetok converts TiTok's VQ tokenizers only")
    if "decoder.ffn.2.weight" in state and "pixel_decoder.conv_in.weight" not in state:
        raise CheckpointError("a stage-1 TiTok checkpoint (its decoder predicts MaskGIT-VQGAN codes, but there is no "
                              "pixel_decoder.* / pixel_quantize.*): only stage-2 (finetune_decoder) checkpoints decode to pixels")


def _check_config(vq: dict[str, Any], implied: dict[str, Any]) -> None:
    for key, value in implied.items():
        if vq.get(key) is not None and vq[key] != value:
            raise CheckpointError(f"the config's model.vq_model.{key}={vq[key]!r} does not fit the checkpoint's "
                                  f"tensors ({value!r})")


def _check_sizes(config: dict[str, Any] | None, built: dict[str, Any]) -> None:
    """The config's model sizes and crop size against the widths and image size the tensors imply."""
    if not config:
        return
    vq, decoder = _vq_model(config), built["decoder"].get("code_decoder", built["decoder"])
    for key, part in (("vit_enc_model_size", built["encoder"]), ("vit_dec_model_size", decoder)):
        if vq.get(key) is not None and MODEL_WIDTHS.get(vq[key]) != part["width"]:
            raise CheckpointError(f"the config's model.vq_model.{key}={vq[key]!r} does not fit the checkpoint's "
                                  f"{part['width']}-wide tensors")
    crop = ((config.get("dataset") or {}).get("preprocessing") or {}).get("crop_size")
    if crop is not None and crop != built["encoder"]["resolution"]:
        raise CheckpointError(f"the config's dataset.preprocessing.crop_size={crop!r} does not fit the checkpoint's "
                              f"position tables ({built['encoder']['resolution']}px images)")


def _architecture(state: dict[str, torch.Tensor], vq: dict[str, Any]) -> dict[str, Any]:
    encoder = _vit(state, "encoder")
    codebook = _tensor(state, "quantize.embedding.weight")
    token_size = _tensor(state, "encoder.conv_out.weight").shape[0]
    legacy = "decoder.ffn.2.weight" in state  # TiTok's is_legacy: the proxy-code head and the encoder's reshape
    l2 = bool(vq.get("use_l2_norm", legacy))  # as released: on with the proxy-code head, off with the pixel head
    if "use_l2_norm" not in vq:
        log.info("TiTok: use_l2_norm=%s assumed (as in the release with this decoder); config=<its config.json> states it", l2)
    _check_config(vq, {"codebook_size": codebook.shape[0], "token_size": token_size, "is_legacy": legacy,
                       "num_latent_tokens": encoder["num_latent_tokens"], "finetune_decoder": legacy})
    decoder = {**_vit(state, "decoder", encoder["resolution"]), "z_channels": _tensor(state, "decoder.decoder_embed.weight").shape[1]}
    if legacy:
        logits = state["decoder.ffn.2.weight"].shape[0]
        pixel_codes = _tensor(state, "pixel_quantize.embedding.weight")
        decoder = {"_target_": "imagetok.nets.proxy_codes.ProxyCodeDecoder",
                   "code_decoder": {"_target_": "imagetok.nets.titok.TiTokDecoder", **decoder, "head": "logits",
                                    "num_logits": logits, "unit_interval": False},
                   "pixel_decoder": _pixel_decoder(state),
                   "codebook_size": pixel_codes.shape[0], "codebook_dim": pixel_codes.shape[1], "train_codebook": False}
    else:
        decoder = {"_target_": "imagetok.nets.titok.TiTokDecoder", **decoder, "head": "pixels"}
    return {"encoder": {"_target_": "imagetok.nets.titok.TiTokEncoder", **encoder, "z_channels": token_size,
                        "legacy_token_layout": legacy},
            "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": codebook.shape[1],
                          "codebook_size": codebook.shape[0], "l2_normalize": l2},
            "decoder": decoder}


def _rename(key: str, legacy: bool) -> str | None:
    """TiTok name -> imagetok name (``legacy``: the decoder is a ProxyCodeDecoder); None for what is dropped."""
    if key == "latent_tokens":
        return "encoder.latent_tokens"
    if key == "quantize.embedding.weight":
        return "quantizer.codebook"
    if key == "pixel_quantize.embedding.weight":
        return "decoder.codebook"
    if key.startswith("pixel_decoder."):
        return "decoder." + key
    match = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if match is None:
        return None  # e.g. a quantizer's usage statistics (embed_prob)
    part, rest = match.groups()
    block = re.match(r"^transformer\.(\d+)\.(.*)$", rest)
    if block:
        name = block.group(2)
        old = next((o for o in _BLOCK if name == o or name.startswith(o + ".")), None)
        rest = f"transformer.blocks.{block.group(1)}.{name if old is None else _BLOCK[old] + name[len(old):]}"
    rest = {"class_embedding": "class_token", "positional_embedding": "positions", "mask_token": "mask_token",
            "latent_token_positional_embedding": "latent_positions", "decoder_embed.weight": "proj_in.weight",
            "decoder_embed.bias": "proj_in.bias", "conv_out.weight": "proj_out.weight" if part == "encoder" else "conv_out.weight",
            "conv_out.bias": "proj_out.bias" if part == "encoder" else "conv_out.bias"}.get(rest, rest)
    rest = re.sub(r"^ln_pre\.", "norm_pre.", rest)
    rest = re.sub(r"^ln_post\.", "transformer.norm.", rest)
    rest = re.sub(r"^ffn\.([02])\.", lambda m: f"head.{m.group(1)}." if legacy else "to_pixels.", rest)
    prefix = "decoder.code_decoder." if part == "decoder" and legacy else f"{part}."
    return prefix + rest


def _reshaped(key: str, value: torch.Tensor) -> torch.Tensor:
    """TiTok's 1x1 convs and ``[1, width]`` / ``[1, 1, width]`` tokens -> our linear layers and ``[width]`` tokens."""
    if re.search(r"(proj_out|head\.\d|to_pixels)\.weight$", key) and value.ndim == 4:
        return value[:, :, 0, 0]
    if key.endswith(("class_token", "mask_token")):
        return value.reshape(-1)
    return value


def convert_titok(checkpoint: dict[str, Any], config: dict[str, Any] | None = None) -> Tokenizer:
    """A TiTok state dict (bare, or under ``state_dict`` / ``model``) -> a :class:`Tokenizer` in eval mode whose
    ``encode`` gives TiTok's ``min_encoding_indices`` as ``[B, N, 1]`` and whose ``decode`` is TiTok's
    ``decode_tokens`` mapped to [-1, 1] (``2 y - 1``, without TiTok's demo clamp).

    ``config``: TiTok's config as a dict (:func:`load_titok_config`), optional. Raises
    :class:`CheckpointError` (one line) for the variants imagetok cannot express (see the module)."""
    state = {k: v for k, v in (LAYOUT.state_of(checkpoint) or {}).items() if torch.is_tensor(v)}
    vq = _vq_model(config)
    _refuse_variants(state, vq)
    built = _architecture(state, vq)
    _check_sizes(config, built)
    legacy = built["encoder"]["legacy_token_layout"]
    tensors = {}
    for key, value in state.items():
        new = _rename(key, legacy)
        if new is not None:
            tensors[new] = _reshaped(new, value)
    try:
        tokenizer = Tokenizer.from_config(built)
    except ValueError as err:
        raise CheckpointError(f"the tensors imply a TiTok architecture imagetok cannot build: {' '.join(str(err).split())}") from None
    dim = built["quantizer"]["dim"]
    for name in ("quant_conv", "post_quant_conv"):  # TiTok quantizes the encoder's output itself
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = torch.eye(dim), torch.zeros(dim)
    load_converted_weights(tokenizer, tensors, "the TiTok checkpoint")
    log.info("converted a TiTok checkpoint: %s", built)
    return tokenizer.eval()


def load_titok_config(path: str | Path) -> dict[str, Any]:
    """TiTok's config: the Hub repo's ``config.json`` (the ``TiTok`` module's OmegaConf config as JSON)
    or one of the repo's ``configs/*/TiTok/*.yaml``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        text = path.read_text()
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable TiTok config ({type(err).__name__})") from None
    if not isinstance(config, dict) or not isinstance((config.get("model") or {}).get("vq_model"), dict):
        raise CheckpointError(f"{path} is not a TiTok config: no model.vq_model")
    return config


def detect(checkpoint: Any, **_: Any) -> bool:
    """``from=auto`` / ``from=titok``'s check, on the entries' names alone (``config`` does not change what the file is)."""
    return LAYOUT.matches(checkpoint)


def convert_from_export(checkpoint: Any, *, config: str | Path | None = None) -> Tokenizer:
    """``export.py from=titok checkpoint=<file> [config=<config.json or yaml>]``."""
    return convert_titok(checkpoint, load_titok_config(config) if config else None)


register(SourceFormat("titok", LAYOUT.describe(), detect, convert_from_export, options=("config",)))
