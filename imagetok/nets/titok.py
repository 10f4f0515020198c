"""TiTok's own 1D tokenizer transformer (Yu et al. 2024, https://arxiv.org/abs/2406.07550), laid out as
its released checkpoints are, so that they run here unchanged.

It is the idea of :mod:`imagetok.nets.latent_tokens` (learned latent tokens read the image through one
transformer; mask tokens read the latent tokens back), with the details of TiTok's CLIP-style ViT:
a class token in front of the patch tokens, one learned position table for ``[class, patches]`` and a
second one added to the latent tokens, a LayerNorm before the first block (``norm_pre``) and after the
last (``transformer.norm``), and a strided conv as patch embedding. The decoder ends either in a head
of logits over a grid tokenizer's codebook (TiTok's proxy codes: ``head="logits"``, used inside
:class:`~imagetok.nets.proxy_codes.ProxyCodeDecoder`) or in pixels (``head="pixels"``: a linear map to
each patch's pixels and a 3x3 conv, TiTok's VQ-8k models).

Two facts of the releases that change the function are options: ``unit_interval`` (the weights expect
and produce images in [0, 1]) and the encoder's ``legacy_token_layout``: TiTok's first models (the
``is_legacy`` configs, all three VQ-4096 releases) reshape the normalised ``[B, N, width]`` latent
tokens into ``[B, width, N]`` *without transposing* before the 1x1 output projection, so each output
token mixes features of several latent tokens; the flag reproduces that.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from imagetok.errors import ConfigValueError, check
from imagetok.nets.transformer import Transformer, check_transformer_args, grid_of, unpatchify

HEADS = ("logits", "pixels")


class _TiTokBody(nn.Module):
    """What encoder and decoder share: the class token, the two position tables, ``norm_pre`` and the
    transformer (pre-norm blocks and the final LayerNorm, TiTok's ``ln_post``)."""

    token_layout = "sequence"

    def __init__(self, patch_size: int, width: int, depth: int, num_heads: int, mlp_ratio: float,
                 resolution: int, num_latent_tokens: int, unit_interval: bool) -> None:
        super().__init__()
        check_transformer_args(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               patch_size=patch_size, resolution=resolution, pos_embed="learned")
        check(isinstance(num_latent_tokens, int) and num_latent_tokens >= 1, "num_latent_tokens", num_latent_tokens,
              "a positive integer, e.g. 32 or 128")
        self.patch_size, self.num_latent_tokens, self.unit_interval = patch_size, num_latent_tokens, unit_interval
        self.grid = (resolution // patch_size,) * 2
        scale = width**-0.5  # TiTok's initialisation of its tokens and tables
        self.class_token = nn.Parameter(torch.randn(width) * scale)
        self.positions = nn.Parameter(torch.randn(1 + self.grid[0] * self.grid[1], width) * scale)  # [class, patches]
        self.latent_positions = nn.Parameter(torch.randn(num_latent_tokens, width) * scale)
        self.norm_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)

    def with_class_token(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, P, width]`` -> ``[B, 1 + P, width]`` with the class token and positions."""
        cls = self.class_token.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions.to(patches.dtype)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.norm_pre(x))


class TiTokEncoder(_TiTokBody):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] (``H = W = resolution``) -> latent tokens
    ``[B, num_latent_tokens, z_channels]``.

    Args:
        patch_size / width / depth / num_heads / mlp_ratio / resolution: the ViT (TiTok-S/B/L: width
            512/768/1024, depth 8/12/24, 8/12/16 heads; patch 16 at 256x256).
        z_channels: channels of each latent token (TiTok's ``token_size``, 12 in the VQ releases).
        num_latent_tokens: ``N`` (32, 64, 128, 256 in the releases).
        legacy_token_layout: TiTok's ``is_legacy`` reshape before the output projection (see the module).
        unit_interval: the weights expect images in [0, 1] (TiTok's releases): ``(x + 1) / 2`` first.
    """

    def __init__(self, *, in_channels: int = 3, patch_size: int = 16, width: int = 512, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0, z_channels: int = 12, resolution: int = 256,
                 num_latent_tokens: int = 32, legacy_token_layout: bool = False, unit_interval: bool = False) -> None:
        super().__init__(patch_size, width, depth, num_heads, mlp_ratio, resolution, num_latent_tokens, unit_interval)
        self.in_channels, self.z_channels, self.downsample_factor = in_channels, z_channels, patch_size
        self.legacy_token_layout = legacy_token_layout
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.latent_tokens = nn.Parameter(torch.randn(num_latent_tokens, width) * width**-0.5)
        self.proj_out = nn.Linear(width, z_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = grid_of(tuple(images.shape[-2:]), self.patch_size)
        if grid != self.grid:  # the position table is learned for one grid
            raise ConfigValueError("images", f"{images.shape[-2]}x{images.shape[-1]}",
                                   f"{self.grid[0] * self.patch_size}x{self.grid[1] * self.patch_size} "
                                   "(TiTok's position embeddings are learned for one image size)")
        x = images if not self.unit_interval else (images + 1) * 0.5
        patches = rearrange(self.patch_embed(x), "b c h w -> b (h w) c")  # [B, P, width]
        x = self.with_class_token(patches)  # [B, 1 + P, width]
        dtype = x.dtype
        latents = (self.latent_tokens.to(dtype) + self.latent_positions.to(dtype)).expand(x.shape[0], -1, -1)
        x = self.run(torch.cat([x, latents], dim=1))  # [B, 1 + P + N, width]
        tokens = x[:, x.shape[1] - self.num_latent_tokens:]  # [B, N, width]
        if self.legacy_token_layout:  # [B, N, width] read as [B, width, N] (a reshape, no transpose) -> [B, N, width]
            b, n, w = tokens.shape
            tokens = tokens.reshape(b, w, n).transpose(1, 2)
        return self.proj_out(tokens)


class TiTokDecoder(_TiTokBody):
    """Latent tokens ``[B, k, z_channels]`` (``k <= num_latent_tokens``; TiTok trains with all ``N``)
    -> ``head="pixels"``: images ``[B, out_channels, resolution, resolution]``, unbounded (trained
    toward [-1, 1]); ``head="logits"``: unnormalised logits ``[B, num_logits, h, w]`` over a grid
    tokenizer's codebook, ``h = w = resolution / patch_size`` (one grid position per patch).

    Args: as :class:`TiTokEncoder`, and
        head: ``"logits"`` (linear ``width -> 2 width``, tanh, linear ``-> num_logits``: TiTok's proxy-code
            head) or ``"pixels"`` (linear to each patch's ``p * p * out_channels`` pixels, then a 3x3 conv).
        num_logits: the grid tokenizer's codebook size (1024 for MaskGIT's VQGAN); ``head="logits"`` only.
        unit_interval: ``head="pixels"`` weights that produce [0, 1] (TiTok's releases): ``2 y - 1``.
    """

    variable_length = False  # TiTok trains with every token: prefixes are not meant to decode

    def __init__(self, *, out_channels: int = 3, patch_size: int = 16, width: int = 512, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0, z_channels: int = 12, resolution: int = 256,
                 num_latent_tokens: int = 32, head: str = "pixels", num_logits: int = 1024,
                 unit_interval: bool = False) -> None:
        super().__init__(patch_size, width, depth, num_heads, mlp_ratio, resolution, num_latent_tokens, unit_interval)
        check(head in HEADS, "head", head, f"one of {list(HEADS)}")
        check(isinstance(num_logits, int) and num_logits >= 2, "num_logits", num_logits, "an integer >= 2")
        self.out_channels, self.z_channels, self.head_kind = out_channels, z_channels, head
        self.proj_in = nn.Linear(z_channels, width)
        self.mask_token = nn.Parameter(torch.randn(width) * width**-0.5)
        if head == "logits":
            self.num_logits = num_logits
            self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, num_logits))
        else:
            self.to_pixels = nn.Linear(width, patch_size * patch_size * out_channels)
            self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last layer: the adaptive GAN weight compares gradient norms here."""
        return self.head[-1].weight if self.head_kind == "logits" else self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 3 or not 1 <= z.shape[1] <= self.num_latent_tokens:
            raise ConfigValueError("latent tokens", tuple(z.shape),
                                   f"[B, k, {self.z_channels}] with 1 <= k <= num_latent_tokens={self.num_latent_tokens}")
        b, k = z.shape[:2]
        latents = self.proj_in(z) + self.latent_positions[:k].to(z.dtype)  # [B, k, width]
        num_patches = self.grid[0] * self.grid[1]
        masks = self.with_class_token(self.mask_token.to(latents.dtype).expand(b, num_patches, -1))
        x = self.run(torch.cat([masks, latents], dim=1))[:, 1 : 1 + num_patches]  # [B, P, width]
        if self.head_kind == "logits":
            return rearrange(self.head(x), "b (h w) v -> b v h w", h=self.grid[0])  # [B, V, h, w]
        images = self.conv_out(unpatchify(self.to_pixels(x), self.grid, self.patch_size))
        return images * 2 - 1 if self.unit_interval else images
