"""taming-transformers VQGAN (``VQModel`` Lightning checkpoints; Esser et al. 2021).

``{"state_dict": ...}`` with ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv``
and ``post_quant_conv``; the discriminator and LPIPS under ``loss.*`` are dropped. imagetok's CNN uses
the same module names, so converting is renaming the codebook.
"""

from __future__ import annotations

from typing import Any

from imagetok.export.converters.registry import KeyLayout, register_key_layout
from imagetok.export.converters.vqgan_cnn import build_vqgan
from imagetok.tokenizer import Tokenizer

LAYOUT = KeyLayout(containers=("state_dict",),
                   required=("quantize.embedding.weight", "encoder.conv_in.weight", "encoder.down.", "decoder.up."),
                   # VAR's multi-scale VQVAE shares taming's encoder/decoder names; its quantizer adds quant_resi
                   # (phi convs) and ema_vocab_hit_SV; SEED-Voken's IBQ shares them too, with LitEma shadows
                   excluded=("quantize.quant_resi.", "quantize.ema_vocab_hit_SV", "model_ema.quantizeembeddingweight"))


def convert_taming(checkpoint: dict[str, Any]) -> Tokenizer:
    """A taming-transformers VQGAN checkpoint (``{"state_dict": ...}`` or a bare state dict) -> Tokenizer."""
    state = LAYOUT.state_of(checkpoint) or {}
    # loss.* (discriminator, LPIPS) and quantizer buffers (index remapping) are not part of the tokenizer
    renamed = {("quantizer.codebook" if k == "quantize.embedding.weight" else k): v for k, v in state.items()
               if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")
               or k == "quantize.embedding.weight"}
    return build_vqgan(renamed, l2_normalize=False)


register_key_layout("taming", LAYOUT, convert_taming)
