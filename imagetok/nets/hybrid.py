"""Hybrid CNN + transformer 1D latent-token encoder and decoder, as GigaTok builds them (Xiong et al. 2025,
"GigaTok: Scaling Visual Tokenizers to 3 Billion Parameters for Autoregressive Image Generation",
https://arxiv.org/abs/2504.08736).

Encoder: a VQGAN-family CNN (``nets/cnn.py``'s :class:`~imagetok.nets.cnn.Encoder`) downsamples the image
by ``f = 2 ** (len(ch_mult) - 1)`` into a ``width``-channel feature grid; a transformer with
``num_latent_tokens`` learned queries appended to the grid cells reads it out into 1D tokens (TiTok /
Q-Former style, :class:`~imagetok.nets.latent_tokens.LatentQueryReadout`); only the latent tokens
leave, ``[B, N, z_channels]``. Decoder, the mirror: a transformer from one mask token per grid cell
plus the latent tokens to a feature grid (:class:`~imagetok.nets.latent_tokens.MaskTokenDecode`), then
the CNN decoder upsamples it to pixels.

Everything the plain 1D nets offer carries over: ``causal`` tokens (SEED), ``token_drop`` prefix training
(FlexTok's pow2 nested dropout, One-D-Piece's uniform tail drop), so ``tok.decode(ids[:, :k])`` decodes
any prefix. The convolutions give the transformer local features instead of raw pixel patches, and give
the decoder a learned upsampler instead of a per-patch linear map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from imagetok.nets.cnn import Decoder, Encoder
from imagetok.nets.latent_tokens import LatentQueryReadout, MaskTokenDecode
from imagetok.nets.token_norm import make_output_norm
from imagetok.nets.transformer import check_transformer_args, init_weights


def _check_hybrid(ch_mult: Sequence[int], width: int, depth: int, num_heads: int, mlp_ratio: float,
                  resolution: int, pos_embed: str) -> int:
    """The downsampling factor ``f``, after checking the transformer's arguments against the grid."""
    factor = 2 ** (len(ch_mult) - 1) if len(ch_mult) else 1
    check_transformer_args(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, patch_size=factor,
                           resolution=resolution, pos_embed=pos_embed)
    return factor


class HybridLatentTokenEncoder(LatentQueryReadout):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> latent tokens ``[B, num_latent_tokens, z_channels]``
    (unbounded; the quantizer's input).

    Args:
        ch / ch_mult / num_res_blocks / attn_resolutions / dropout / mid_attention: the CNN, as
            :class:`~imagetok.nets.cnn.Encoder`; its output is the ``[B, width, H/f, W/f]`` grid.
        width / depth / num_heads / mlp_ratio / pos_embed: the transformer over the ``(H/f) * (W/f)``
            grid cells plus the latent queries, as :class:`~imagetok.nets.latent_tokens.LatentTokenEncoder`.
        z_channels: channels per latent token.
        resolution: training image size (CNN attention placement and the grid's learned positions).
        num_latent_tokens: ``N``, tokens per image.
        causal: latent token ``i`` sees the grid and tokens ``<= i`` only (SEED's causal 1D tokens).
        output_norm: ``none`` | ``batch``, as :class:`~imagetok.nets.latent_tokens.LatentTokenEncoder`.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 32, ch_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 mid_attention: bool = False, width: int = 128, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0, z_channels: int = 16, resolution: int = 256, pos_embed: str = "learned",
                 num_latent_tokens: int = 32, causal: bool = False, output_norm: str = "none") -> None:
        super().__init__()
        factor = _check_hybrid(ch_mult, width, depth, num_heads, mlp_ratio, resolution, pos_embed)
        self.in_channels, self.z_channels, self.downsample_factor = in_channels, z_channels, factor
        self.cnn = Encoder(in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           attn_resolutions=attn_resolutions, z_channels=width, dropout=dropout,
                           resolution=resolution, mid_attention=mid_attention)
        self.init_readout(grid=(resolution // factor,) * 2, width=width, depth=depth, num_heads=num_heads,
                          mlp_ratio=mlp_ratio, pos_embed=pos_embed, num_latent_tokens=num_latent_tokens, causal=causal)
        self.proj_out = nn.Linear(width, z_channels)
        self.output_norm = make_output_norm(output_norm, num_latent_tokens, z_channels)
        init_weights(self)  # linear layers, norms, queries and positions; the convolutions keep torch's init

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.cnn(images)  # [B, width, H/f, W/f]
        grid = tuple(features.shape[-2:])
        return self.output_norm(self.proj_out(self.read_out(rearrange(features, "b c h w -> b (h w) c"), grid)))


class HybridLatentTokenDecoder(MaskTokenDecode):
    """Latent tokens ``[B, k, z_channels]`` (any ``1 <= k <= num_latent_tokens``: a prefix of the sequence)
    -> images ``[B, out_channels, resolution, resolution]``, unbounded (trained toward [-1, 1]).

    Args:
        ch / ch_mult / num_res_blocks / attn_resolutions / dropout / mid_attention: the CNN, as
            :class:`~imagetok.nets.cnn.Decoder`, upsampling the ``[B, width, resolution/f, resolution/f]``
            grid the transformer writes.
        width / depth / num_heads / mlp_ratio / pos_embed / num_latent_tokens / token_drop / min_tokens:
            as :class:`~imagetok.nets.latent_tokens.LatentTokenDecoder`.
        resolution: output size (the grid is ``resolution / f`` on a side).
    """

    def __init__(self, *, out_channels: int = 3, ch: int = 32, ch_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 mid_attention: bool = False, width: int = 128, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0, z_channels: int = 16, resolution: int = 256, pos_embed: str = "learned",
                 num_latent_tokens: int = 32, token_drop: str = "none", min_tokens: int = 1) -> None:
        super().__init__()
        factor = _check_hybrid(ch_mult, width, depth, num_heads, mlp_ratio, resolution, pos_embed)
        self.out_channels, self.z_channels, self.downsample_factor = out_channels, z_channels, factor
        self.proj_in = nn.Linear(z_channels, width)
        self.init_decode(grid=(resolution // factor,) * 2, width=width, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, pos_embed=pos_embed, num_latent_tokens=num_latent_tokens,
                         token_drop=token_drop, min_tokens=min_tokens)
        self.cnn = Decoder(out_channels=out_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           attn_resolutions=attn_resolutions, z_channels=width, dropout=dropout,
                           resolution=resolution, mid_attention=mid_attention)
        init_weights(self)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the CNN's output conv: the adaptive GAN weight compares gradient norms here."""
        return self.cnn.last_layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_latents(z)
        cells = self.decode_grid(self.proj_in(z))  # [B, h*w, width]
        return self.cnn(rearrange(cells, "b (h w) c -> b c h w", h=self.grid[0]))
