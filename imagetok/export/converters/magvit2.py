"""Converter for TencentARC SEED-Voken's tokenizers: Open-MAGVIT2 (LFQ) and IBQ Lightning checkpoints.

- **Open-MAGVIT2** (``src/Open_MAGVIT2/models/lfqgan.py``, e.g. ``imagenet_256_L.ckpt``, 2^18 codes):
  the MAGVIT-v2 encoder/decoder of ``improved_model.py`` (``encoder.mid_block.*``, ``decoder.adaptive.*``)
  -> :mod:`imagetok.nets.magvit2`, and its parameter-free LFQ -> ``lfq``. There is no ``quant_conv``:
  ours become identity 1x1 convs. Code bit ``j`` is channel ``j`` (``x_j > 0``), worth ``2^j`` (channel 0
  least significant), as in imagetok's ``lfq``; with ``token_factorization`` the 2^18 index is two
  sub-tokens ``(channels 0..8, channels 9..17)``, imagetok's ``bits_per_token=9`` (``factorized_bits:
  [6, 12]``, the repo's AR configs: ``bits_per_token=[6, 12]``).
- **IBQ** (``src/IBQ/models/ibqgan.py``, 2^10..2^18 codes): taming's VQGAN encoder/decoder and
  ``quant_conv``s -> :mod:`imagetok.nets.cnn`, ``quantize.embedding.weight`` -> ``ibq`` with the
  largest inner product ``z.c`` (the argmax of IBQ's softmax), no normalisation.

SEED-Voken trains with ``use_ema: True`` and evaluates inside ``ema_scope``: its ``LitEma`` shadows
(``model_ema.<name without dots>``) are used when present (``weights="ema"``), else the raw weights.

The architecture comes from the tensors' names and shapes. Two facts are not in the tensors and come
from the project's own training yaml (``config``): Open-MAGVIT2's ``token_factorization`` /
``factorized_bits`` (without a yaml: one 18-bit index, what its tokenizer's ``encode`` returns), and
that a checkpoint in taming's layout is IBQ rather than a taming VQGAN when it has no EMA shadows.
Values the yaml shares with the tensors (widths, levels, codebook) are checked against them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from imagetok.errors import CheckpointError
from imagetok.export.converters.registry import SourceFormat, register
from imagetok.export.converters.vqgan_cnn import _architecture
from imagetok.export.converters.weights import load_converted_weights
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def _state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    return state if isinstance(state, dict) else {}


def _family(state: dict[str, Any]) -> str | None:
    """``"lfq"`` (Open-MAGVIT2's MAGVIT-v2 nets), ``"ibq"`` (taming nets + a codebook) or None."""
    if "encoder.mid_block.0.conv1.weight" in state and "decoder.adaptive.0.gamma.weight" in state:
        return "lfq"
    if "quantize.embedding.weight" in state and "encoder.down.0.block.0.conv1.weight" in state:
        return "ibq"
    return None


def looks_like_magvit2(checkpoint: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` is a SEED-Voken Open-MAGVIT2 or IBQ checkpoint. The IBQ layout is taming's,
    so it counts only with SEED-Voken's EMA shadow of the codebook (every released IBQ config trains
    with EMA); an IBQ checkpoint without one converts with ``from=magvit2 config=<its yaml>``."""
    state = _state(checkpoint)
    family = _family(state)
    return family == "lfq" or (family == "ibq" and f"{EMA_PREFIX}quantizeembeddingweight" in state)


def load_seed_voken_config(path: str | Path) -> dict[str, Any]:
    """A SEED-Voken training yaml (LightningCLI: ``model.class_path`` / ``model.init_args``) as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable yaml file ({type(err).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model", {}).get("init_args"), dict):
        raise CheckpointError(f"{path} is not a SEED-Voken training config: no model.init_args")
    return config


def _init_args(config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(``model.init_args``, ``model.class_path``) of a SEED-Voken yaml dict (or the init_args alone)."""
    if not config:
        return {}, ""
    model = config.get("model", config)
    return model.get("init_args", model), str(model.get("class_path", ""))


def _weights(state: dict[str, Any], keys: list[str], weights: str) -> dict[str, torch.Tensor]:
    """The tensors of ``keys`` from the LitEma shadows (``weights="ema"`` and shadows present) or raw."""
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"weights={weights!r} is invalid: allowed values are 'ema' or 'raw'")
    if weights == "ema" and any(k.startswith(EMA_PREFIX) for k in state):
        shadow = {k: EMA_PREFIX + k.replace(".", "") for k in keys}
        missing = [k for k, s in shadow.items() if s not in state]
        if missing or len(set(shadow.values())) < len(shadow):
            raise CheckpointError(f"the checkpoint's EMA weights (model_ema.*) lack {len(missing)} of its "
                                  f"{len(keys)} tokenizer tensors (e.g. {missing[:1]}); convert with weights=raw")
        return {k: state[shadow[k]] for k in keys}
    if weights == "ema":
        log.info("no EMA weights (model_ema.*) in the checkpoint: converting its raw weights")
    return {k: state[k] for k in keys}


def _magvit2_architecture(state: dict[str, torch.Tensor], part: str) -> dict[str, Any]:
    """``Magvit2Encoder`` / ``Magvit2Decoder`` arguments implied by ``{part}.down|up.i.block.j`` tensors."""
    levels_key = "down" if part == "encoder" else "up"
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{part}.{levels_key}.")})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"not an Open-MAGVIT2 checkpoint: {part} levels {levels} are not 0..n-1")
    widths = [state[f"{part}.{levels_key}.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    ch = state["encoder.conv_in.weight"].shape[0] if part == "encoder" else min(widths)
    if any(w % ch for w in widths):
        raise CheckpointError(f"{part} widths {widths} are not multiples of the base width {ch}")
    blocks = len({k.split(".")[4] for k in state if k.startswith(f"{part}.{levels_key}.0.block.")})
    z_key, z_dim = ("encoder.conv_out.weight", 0) if part == "encoder" else ("decoder.conv_in.weight", 1)
    return {"ch": ch, "ch_mult": [w // ch for w in widths], "num_res_blocks": blocks, "z_channels": state[z_key].shape[z_dim]}


def _check_config(init: dict[str, Any], implied: dict[str, Any]) -> None:
    """Each value the yaml states (``ddconfig.*``, ``n_embed``, ``embed_dim``) equals the tensors' one."""
    stated = {**{f"ddconfig.{k}": v for k, v in (init.get("ddconfig") or {}).items()},
              "n_embed": init.get("n_embed"), "embed_dim": init.get("embed_dim")}
    for key, value in implied.items():
        given = stated.get(key)
        if given is not None and (list(given) if isinstance(value, list) else given) != value:
            raise CheckpointError(f"the config's {key}={stated[key]!r} does not fit the checkpoint's tensors ({value!r})")


def _lfq_config(state: dict[str, torch.Tensor], init: dict[str, Any]) -> dict[str, Any]:
    if state["encoder.conv_in.weight"].ndim != 4:
        raise CheckpointError("an Open-MAGVIT2 video tokenizer (3D convolutions) is not supported: only image tokenizers")
    if any(".conv_shortcut." in k for k in state):
        raise CheckpointError("Open-MAGVIT2 residual blocks with 3x3 conv_shortcut are not supported (only nin_shortcut)")
    encoder, decoder = _magvit2_architecture(state, "encoder"), _magvit2_architecture(state, "decoder")
    bits = encoder["z_channels"]
    if decoder["z_channels"] != bits:
        raise CheckpointError(f"the encoder emits {bits} channels but the decoder takes {decoder['z_channels']}")
    _check_config(init, {"ddconfig.ch": encoder["ch"], "ddconfig.ch_mult": encoder["ch_mult"],
                         "ddconfig.num_res_blocks": encoder["num_res_blocks"], "ddconfig.z_channels": bits,
                         "n_embed": 2**bits, "embed_dim": bits})
    bits_per_token: int | list[int] = bits
    if init.get("token_factorization"):  # sub-token k: the next factorized_bits[k] channels, LSB first
        split = [int(b) for b in init.get("factorized_bits") or [9, 9]]
        if sum(split) != bits or len(split) != 2 or min(split) < 1:
            raise CheckpointError(f"factorized_bits={split} does not split the checkpoint's {bits} bits in two")
        bits_per_token = split[0] if split[0] == split[1] else split
    return {"encoder": {"_target_": "imagetok.nets.magvit2.Magvit2Encoder", **encoder},
            "decoder": {"_target_": "imagetok.nets.magvit2.Magvit2Decoder", **decoder},
            "quantizer": {"_target_": "imagetok.quantizers.lfq.LookupFreeQuantizer", "dim": bits, "bits": bits,
                          "bits_per_token": bits_per_token, "codebook_scale": 1.0}}


def _ibq_config(state: dict[str, torch.Tensor], init: dict[str, Any]) -> dict[str, Any]:
    encoder, decoder = _architecture(state, "encoder"), _architecture(state, "decoder")
    codebook_size, dim = state["quantizer.codebook"].shape
    _check_config(init, {"ddconfig.ch": encoder["ch"], "ddconfig.ch_mult": encoder["ch_mult"],
                         "ddconfig.num_res_blocks": encoder["num_res_blocks"],
                         "ddconfig.z_channels": encoder["z_channels"], "n_embed": codebook_size, "embed_dim": dim})
    return {"encoder": {"_target_": "imagetok.nets.cnn.Encoder", **encoder},
            "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **decoder},
            # IBQ's index is the argmax of softmax(z.c): the largest inner product, no normalisation
            "quantizer": {"_target_": "imagetok.quantizers.ibq.IndexBackpropQuantizer", "dim": dim,
                          "codebook_size": codebook_size, "similarity": "dot", "temperature": 1.0}}


def _identity_conv(out_channels: int, in_channels: int) -> dict[str, torch.Tensor]:
    # Open-MAGVIT2 quantizes the encoder's output itself: a 1x1 identity conv is exact (x * 1 + 0)
    return {"weight": torch.eye(out_channels, in_channels)[:, :, None, None], "bias": torch.zeros(out_channels)}


def _rename(key: str) -> str:
    if key == "quantize.embedding.weight":
        return "quantizer.codebook"
    return re.sub(r"^decoder\.up\.(\d+)\.upsample\.conv1\.", r"decoder.up.\1.upsample.conv.", key)


def convert_magvit2(checkpoint: dict[str, Any], config: dict[str, Any] | None = None, *,
                    weights: str = "ema") -> Tokenizer:
    """A SEED-Voken Open-MAGVIT2 (LFQ) or IBQ checkpoint (``{"state_dict": ...}`` or bare) -> a Tokenizer
    in eval mode. ``config``: the project's training yaml as a dict (:func:`load_seed_voken_config`),
    optional. ``weights``: ``"ema"`` (the LitEma shadows when present, what SEED-Voken evaluates) or ``"raw"``.
    Raises :class:`CheckpointError` (one line) for anything that is not such a checkpoint."""
    state = _state(checkpoint)
    init, class_path = _init_args(config)
    family = _family(state)
    if family == "ibq" and not looks_like_magvit2(checkpoint) and "IBQ" not in class_path:
        raise CheckpointError("not an Open-MAGVIT2/IBQ checkpoint: taming-transformers' layout without SEED-Voken's "
                              "EMA weights (model_ema.*); a taming VQGAN converts with from=taming, an IBQ "
                              "checkpoint saved without EMA with from=magvit2 config=<its SEED-Voken yaml>")
    if family is None:
        raise CheckpointError("not an Open-MAGVIT2/IBQ checkpoint: no encoder.mid_block / decoder.adaptive "
                              "(Open-MAGVIT2) and no quantize.embedding.weight with encoder.down (IBQ) tensors")
    keys = [k for k in state if k.startswith(_PARTS) and torch.is_tensor(state[k])]
    tensors = {_rename(k): v for k, v in _weights(state, keys, weights).items()}
    try:
        built = _lfq_config(tensors, init) if family == "lfq" else _ibq_config(tensors, init)
    except KeyError as err:
        raise CheckpointError(f"not a complete {family} checkpoint: it lacks the tensor {err.args[0]}") from None
    except ValueError as err:  # the shared taming reader's check() of the levels / widths
        raise CheckpointError(f"not a convertible {family} checkpoint: {err}") from None
    tokenizer = Tokenizer.from_config(built)
    if family == "lfq":
        z, bits = built["encoder"]["z_channels"], built["quantizer"]["dim"]
        tensors.update({f"quant_conv.{k}": v for k, v in _identity_conv(bits, z).items()})
        tensors.update({f"post_quant_conv.{k}": v for k, v in _identity_conv(built["decoder"]["z_channels"], bits).items()})
    load_converted_weights(tokenizer, tensors, f"the {family} checkpoint")
    log.info("converted a SEED-Voken %s checkpoint (%s weights): %s", "Open-MAGVIT2" if family == "lfq" else "IBQ",
             "EMA" if weights == "ema" and any(k.startswith(EMA_PREFIX) for k in state) else "raw", built)
    return tokenizer.eval()


def _is_ibq_yaml(config: dict[str, Any] | None) -> bool:
    return "IBQ" in _init_args(config)[1]


def detect(checkpoint: Any, *, config: str | Path | None = None, **_: Any) -> bool:
    """``from=auto`` / ``from=magvit2``'s check: :func:`looks_like_magvit2`, or taming's layout with
    ``config=`` naming SEED-Voken's IBQ class (an IBQ checkpoint saved without EMA). The other
    declared options (``weights``) do not change what the file is."""
    if looks_like_magvit2(checkpoint):
        return True
    return bool(config) and _family(_state(checkpoint)) == "ibq" and _is_ibq_yaml(load_seed_voken_config(config))


def convert_from_export(checkpoint: Any, *, config: str | Path | None = None, weights: str = "ema") -> Tokenizer:
    """``export.py from=magvit2 [config=<SEED-Voken yaml>] [weights=ema|raw]``: :func:`convert_magvit2`
    with the yaml read from ``config``."""
    return convert_magvit2(checkpoint, load_seed_voken_config(config) if config else None, weights=weights)


register(SourceFormat(
    "magvit2", '{"state_dict": ...} or a bare state dict with encoder.mid_block.0.conv1.weight and '
    "decoder.adaptive.0.gamma.weight (Open-MAGVIT2), or quantize.embedding.weight, encoder.down.0.block.0.conv1.weight "
    "and model_ema.quantizeembeddingweight (IBQ; without EMA weights: config=<its SEED-Voken yaml>)",
    detect, convert_from_export, options=("config", "weights")))
