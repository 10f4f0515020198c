"""ViT encoder and decoder on a 2D token grid (ViT-VQGAN, Yu et al. 2021, https://arxiv.org/abs/2110.04627).

The encoder cuts an image into ``patch_size`` patches, runs a transformer over them and projects each
patch token to ``z_channels``: latents ``[B, z_channels, H/p, W/p]``, the same layout as the CNN
encoder's, so every quantizer family and the rest of the tokenizer work unchanged. The decoder runs
a transformer over the (projected) quantized grid and maps each token back to a ``p x p`` patch.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from imagetok.nets.transformer import (PatchPositions, Transformer, check_transformer_args, grid_of, init_weights,
                                       patchify, unpatchify)


class ViTEncoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> latents ``[B, z_channels, H/p, W/p]``.

    Args:
        patch_size: side ``p`` of a patch; the downsampling factor.
        width / depth / num_heads / mlp_ratio: the transformer.
        z_channels: output channels per token.
        resolution: training image size (the grid of the learned position table).
        pos_embed: ``learned`` absolute embeddings or ``rope`` (axial 2D rotary in every layer).
    """

    def __init__(self, *, in_channels: int = 3, patch_size: int = 8, width: int = 512, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0, z_channels: int = 32, resolution: int = 256,
                 pos_embed: str = "learned") -> None:
        super().__init__()
        check_transformer_args(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               patch_size=patch_size, resolution=resolution, pos_embed=pos_embed)
        self.in_channels, self.z_channels, self.patch_size = in_channels, z_channels, patch_size
        self.downsample_factor = patch_size
        grid = (resolution // patch_size,) * 2
        self.patch_embed = nn.Linear(in_channels * patch_size**2, width)
        self.positions = PatchPositions(pos_embed, grid, width, num_heads)
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)
        self.proj_out = nn.Linear(width, z_channels)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = grid_of(tuple(images.shape[-2:]), self.patch_size)
        x = self.positions.add(self.patch_embed(patchify(images, self.patch_size)), grid)
        x = self.transformer(x, self.positions.rope(grid, 0, images.device))
        return rearrange(self.proj_out(x), "b (h w) c -> b c h w", h=grid[0])


class ViTDecoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, out_channels, h*p, w*p]``, unbounded (trained
    toward [-1, 1]). Arguments as :class:`ViTEncoder`."""

    def __init__(self, *, out_channels: int = 3, patch_size: int = 8, width: int = 512, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0, z_channels: int = 32, resolution: int = 256,
                 pos_embed: str = "learned") -> None:
        super().__init__()
        check_transformer_args(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               patch_size=patch_size, resolution=resolution, pos_embed=pos_embed)
        self.out_channels, self.z_channels, self.patch_size = out_channels, z_channels, patch_size
        grid = (resolution // patch_size,) * 2
        self.proj_in = nn.Linear(z_channels, width)
        self.positions = PatchPositions(pos_embed, grid, width, num_heads)
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)
        self.to_pixels = nn.Linear(width, out_channels * patch_size**2)
        init_weights(self)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the pixel projection: the adaptive GAN weight compares gradient norms here."""
        return self.to_pixels.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        grid = tuple(z.shape[-2:])
        x = self.positions.add(self.proj_in(rearrange(z, "b c h w -> b (h w) c")), grid)
        x = self.transformer(x, self.positions.rope(grid, 0, z.device))
        return unpatchify(self.to_pixels(x), grid, self.patch_size)
