"""A 1D-token decoder that predicts a grid tokenizer's codes: TiTok's proxy codes (Yu et al. 2024,
"An Image is Worth 32 Tokens for Reconstruction and Generation", https://arxiv.org/abs/2406.07550).

TiTok trains its 1D tokenizer in two stages. In the first, the decoder does not predict pixels: it
predicts, for every cell of a trained grid tokenizer's latent grid, which of that tokenizer's codes the
grid tokenizer picked for the image (the "proxy codes"), with cross-entropy; pixels come from the grid
tokenizer's own decoder. In the second, the whole decoder is fine-tuned on pixels.

:class:`ProxyCodeDecoder` is that decoder: a token net (a
:class:`~imagetok.nets.latent_tokens.LatentTokenDecoder` on the ``h x w`` code grid, ``patch_size=1``,
one logit per code) turns the 1D tokens into code logits; their softmax weights the grid tokenizer's
code vectors (a soft lookup, so pixels stay differentiable); the grid tokenizer's ``post_quant_conv``
and CNN decoder turn those into pixels. The grid tokenizer's parts are filled in from its checkpoint by
:func:`imagetok.training.proxy_codes.complete_decoder_config` and ``load_teacher``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from imagetok.errors import check
from imagetok.utils.build import build


class ProxyCodeDecoder(nn.Module):
    """1D tokens ``[B, k, z_channels]`` -> code logits ``[B, codebook_size, h, w]`` -> images ``[B, 3, H, W]``
    (unbounded, trained toward [-1, 1]).

    Args:
        tokens: the token net (built here from a ``_target_`` dict, or a module): latent tokens
            ``[B, k, z_channels]`` -> ``[B, codebook_size, h, w]``; e.g. a ``LatentTokenDecoder`` with
            ``resolution=h``, ``patch_size=1`` and ``out_channels=codebook_size``.
        pixels: the grid tokenizer's decoder (``_target_`` dict or module): ``[B, pixels.z_channels, h, w]``
            -> images.
        codebook_size: ``V``, the grid tokenizer's number of codes.
        code_dim: ``D``, the width of its quantized latents (its quantizer's ``out_dim``).
        post_quant_kernel_size: kernel of the grid tokenizer's ``post_quant_conv`` (1, or 3 for VAR-style).
    """

    token_layout = "sequence"

    def __init__(self, *, tokens: Mapping[str, Any] | nn.Module, pixels: Mapping[str, Any] | nn.Module,
                 codebook_size: int, code_dim: int, post_quant_kernel_size: int = 1) -> None:
        super().__init__()
        check(isinstance(codebook_size, int) and codebook_size >= 2, "codebook_size", codebook_size, "an integer >= 2")
        check(isinstance(code_dim, int) and code_dim >= 1, "code_dim", code_dim, "a positive integer")
        k = post_quant_kernel_size
        check(isinstance(k, int) and k >= 1 and k % 2 == 1, "post_quant_kernel_size", k, "an odd positive integer")
        self.tokens = tokens if isinstance(tokens, nn.Module) else build(tokens, "tokens")
        self.pixels = pixels if isinstance(pixels, nn.Module) else build(pixels, "pixels")
        self.codebook_size, self.code_dim = codebook_size, code_dim
        # The grid tokenizer's code vectors, [V, D]: copied from it before training (load_teacher) and
        # fixed, so that the logits keep meaning the grid tokenizer's codes in both stages.
        self.register_buffer("codebook", torch.zeros(codebook_size, code_dim))
        self.post_quant_conv = nn.Conv2d(code_dim, self.pixels.z_channels, k, padding=k // 2)
        self.z_channels = self.tokens.z_channels
        self.num_latent_tokens = self.tokens.num_latent_tokens

    @property
    def variable_length(self) -> bool:
        return bool(getattr(self.tokens, "variable_length", False))

    @property
    def last_layer(self) -> torch.Tensor:
        """The pixel decoder's last weight (where the adaptive GAN weight compares gradient norms)."""
        return self.pixels.last_layer

    def code_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latent tokens ``[B, k, z_channels]`` -> logits ``[B, codebook_size, h, w]`` over the proxy codes."""
        return self.tokens(z)

    def codes_to_images(self, logits: torch.Tensor) -> torch.Tensor:
        """Code logits ``[B, V, h, w]`` -> images: the softmax-weighted mean of the code vectors, then the
        grid tokenizer's ``post_quant_conv`` and decoder."""
        probs = logits.float().softmax(dim=1).to(self.codebook.dtype)
        latents = torch.einsum("bvhw,vd->bdhw", probs, self.codebook)
        return self.pixels(self.post_quant_conv(latents))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.codes_to_images(self.code_logits(z))
