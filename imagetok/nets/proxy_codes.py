"""Decoding 1D tokens through a grid tokenizer's codes (TiTok's proxy codes, Yu et al. 2024,
https://arxiv.org/abs/2406.07550, Sec. 3.3).

TiTok's two-stage recipe trains a 1D tokenizer whose decoder does not paint pixels: it predicts, for
each position of a frozen grid tokenizer's latent grid (MaskGIT's VQGAN: 16x16 positions, 1024 codes),
logits over that tokenizer's codebook. Stage 1 trains those logits with cross-entropy against the grid
tokenizer's own codes of the image; stage 2 embeds them softly (``softmax(logits) @ codebook``) and
decodes the result with the grid tokenizer's CNN decoder, fine-tuned end to end on pixels.

:class:`ProxyCodeDecoder` is that decoder: any 1D token decoder that returns ``[B, V, h, w]`` (a
:class:`~imagetok.nets.titok.TiTokDecoder` with ``head="logits"``, or a
:class:`~imagetok.nets.latent_tokens.LatentTokenDecoder` with ``out_channels=V, patch_size=1,
resolution=h``), the grid tokenizer's codebook ``[V, D]``, and its grid decoder ``[B, D, h, w] -> [B, 3, H, W]``.
"""

from __future__ import annotations

import torch
from torch import nn

from imagetok.errors import ConfigValueError, check


class ProxyCodeDecoder(nn.Module):
    """1D latent tokens ``[B, k, z_channels]`` -> images ``[B, 3, H, W]`` (about [-1, 1], unclamped)
    through logits over a grid tokenizer's ``V`` codes.

    As part of a :class:`~imagetok.tokenizer.Tokenizer` config it is one ``_target_`` dict whose
    ``code_decoder`` and ``pixel_decoder`` are ``_target_`` dicts themselves (built first, then passed
    in as modules, by ``Tokenizer.from_config`` as by Hydra)::

        {"_target_": "imagetok.nets.proxy_codes.ProxyCodeDecoder", "codebook_size": 1024, "codebook_dim": 256,
         "code_decoder": {"_target_": "imagetok.nets.titok.TiTokDecoder", "head": "logits", "num_logits": 1024, ...},
         "pixel_decoder": {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitDecoder", "z_channels": 256, ...}}

    Args:
        code_decoder: latent tokens ``[B, k, z_channels]`` -> logits ``[B, codebook_size, h, w]``; needs
            ``z_channels`` (and ``num_latent_tokens``).
        pixel_decoder: the grid tokenizer's decoder, ``[B, codebook_dim, h, w] -> [B, 3, H, W]``.
        codebook_size / codebook_dim: ``V`` and ``D`` of the grid tokenizer's codebook (:attr:`codebook`,
            loaded with its weights; its codes as its quantizer looks them up, e.g. l2-normalised ones
            for a cosine-lookup quantizer).
        train_codebook: whether the codebook receives gradients (TiTok's stage 2 leaves it trainable;
            stage 1 only needs it for decoding).
        post_quant_kernel_size: None (TiTok: the soft codes go straight into the pixel decoder), or the
            kernel of a ``post_quant_conv`` ``D -> pixel_decoder.z_channels`` in between, as an imagetok
            grid tokenizer has (1; 3 for VAR-style ones); its weights come from that tokenizer
            (``losses/proxy_codes.py``).
    """

    token_layout = "sequence"

    def __init__(self, *, code_decoder: nn.Module, pixel_decoder: nn.Module, codebook_size: int,
                 codebook_dim: int, train_codebook: bool = False, post_quant_kernel_size: int | None = None) -> None:
        super().__init__()
        check(isinstance(codebook_size, int) and codebook_size >= 2, "codebook_size", codebook_size, "an integer >= 2")
        check(isinstance(codebook_dim, int) and codebook_dim >= 1, "codebook_dim", codebook_dim, "a positive integer")
        for name, net in (("code_decoder", code_decoder), ("pixel_decoder", pixel_decoder)):
            check(isinstance(net, nn.Module), name, type(net).__name__, "a decoder module (a _target_ dict in configs)")
        check(getattr(code_decoder, "num_logits", codebook_size) == codebook_size, "code_decoder.num_logits",
              getattr(code_decoder, "num_logits", None), f"codebook_size={codebook_size}")
        k = post_quant_kernel_size
        check(k is None or (isinstance(k, int) and k >= 1 and k % 2 == 1), "post_quant_kernel_size", k,
              "null or an odd positive integer")
        if k is None:
            check(getattr(pixel_decoder, "z_channels", codebook_dim) == codebook_dim, "pixel_decoder.z_channels",
                  getattr(pixel_decoder, "z_channels", None), f"codebook_dim={codebook_dim}")
        self.post_quant_conv = (nn.Identity() if k is None else
                                nn.Conv2d(codebook_dim, pixel_decoder.z_channels, k, padding=k // 2))
        self.code_decoder, self.pixel_decoder = code_decoder, pixel_decoder
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.z_channels = code_decoder.z_channels
        self.num_latent_tokens = getattr(code_decoder, "num_latent_tokens", None)
        self.out_channels = getattr(pixel_decoder, "out_channels", 3)
        self.codebook = nn.Parameter(torch.randn(codebook_size, codebook_dim), requires_grad=train_codebook)

    @property
    def variable_length(self) -> bool:
        return bool(getattr(self.code_decoder, "variable_length", False))

    @property
    def last_layer(self) -> torch.Tensor:
        """The pixel decoder's last weight: the adaptive GAN weight compares gradient norms here."""
        return self.pixel_decoder.last_layer

    def code_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latent tokens ``[B, k, z_channels]`` -> unnormalised logits ``[B, V, h, w]`` over the grid
        tokenizer's codes at each grid position (stage 1's cross-entropy takes them with targets ``[B, h, w]``)."""
        logits = self.code_decoder(z)
        if logits.ndim != 4 or logits.shape[1] != self.codebook_size:
            raise ConfigValueError("code_decoder output", tuple(logits.shape), f"[B, codebook_size={self.codebook_size}, h, w]")
        return logits

    def soft_codes(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V, h, w]`` -> the expected code under their softmax, ``[B, D, h, w]`` (a convex
        combination of codebook rows; a one-hot-like softmax gives the hard code)."""
        return torch.einsum("bvhw,vd->bdhw", logits.softmax(dim=1), self.codebook.to(logits.dtype))

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """The grid tokenizer's own codes, LongTensor ``[B, h, w]`` in ``[0, V)`` -> ``[B, D, h, w]``
        (what :meth:`soft_codes` gives for one-hot logits; decode with ``post_quant_conv`` and
        ``pixel_decoder``)."""
        return self.codebook[codes].movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent tokens ``[B, k, z_channels]`` -> images ``[B, 3, H, W]``."""
        return self.pixel_decoder(self.post_quant_conv(self.soft_codes(self.code_logits(z))))
