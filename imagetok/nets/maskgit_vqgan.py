"""MaskGIT's VQGAN encoder and decoder (Chang et al. 2022, https://arxiv.org/abs/2202.04200), as the
PyTorch port TiTok uses for its proxy codes (Yu et al. 2024, https://arxiv.org/abs/2406.07550).

It is VQGAN without attention: average pooling instead of strided convs, bias-free residual convs, the
same number of residual blocks in every encoder and decoder level and in the middle. Its residual block
differs from :class:`~imagetok.nets.blocks.ResnetBlock` in one way that changes the function, kept
here because released weights were trained with it: when a block changes the width, its 1x1 shortcut
is applied to the block's *output*, ``h + W h``, and the block's input is not carried over.

MaskGIT (and TiTok) work on images in [0, 1], imagetok on [-1, 1]: with ``unit_interval=True`` the
encoder maps its input to [0, 1] and the decoder its output back to [-1, 1], so released weights run
unchanged (folding the maps into the first and last convs would round their biases).

Parameter names follow the released checkpoints (``conv_in``, ``mid.{j}``, ``down.{i}.block.{j}``,
``up.{i}.block.{j}``, ``up.{i}.upsample_conv``, ``norm_out``, ``conv_out``), so loading them is a prefix rename.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.nets.blocks import group_norm


def _check(ch: int, ch_mult: Sequence[int], num_res_blocks: int) -> None:
    check(isinstance(ch, int) and ch >= 1, "ch", ch, "a positive integer, e.g. 128")
    check(len(ch_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in ch_mult), "ch_mult", list(ch_mult),
          "a non-empty list of positive integers, e.g. [1, 1, 2, 2, 4]")
    check(isinstance(num_res_blocks, int) and num_res_blocks >= 1, "num_res_blocks", num_res_blocks, "an integer >= 1")


class MaskGitResBlock(nn.Module):
    """norm -> swish -> conv3x3 (no bias), twice; ``[B, C_in, H, W] -> [B, C_out, H, W]``. The skip is
    the input when the width is kept, else ``nin_shortcut`` (1x1, ``C_out -> C_out``) of the output."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels
                             else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        # the released weights learned this skip: a projection of the output, not of the input
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class _Level(nn.Module):
    """``num_blocks`` residual blocks (the first one changes the width), then the optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(MaskGitResBlock(in_channels if j == 0 else out_channels, out_channels)
                                   for j in range(num_blocks))
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor, downsample: bool = False) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if downsample:
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class MaskGitEncoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> latents ``[B, z_channels, H/f, W/f]``,
    ``f = 2**(len(ch_mult) - 1)`` (16 for the released ``ch=128, ch_mult=[1, 1, 2, 2, 4], z_channels=256``).

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per level.
        num_res_blocks: residual blocks per level and in the middle.
        z_channels: output channels.
        unit_interval: the weights expect images in [0, 1] (MaskGIT's release): ``(x + 1) / 2`` first.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, unit_interval: bool = False) -> None:
        super().__init__()
        _check(ch, ch_mult, num_res_blocks)
        self.in_channels, self.z_channels, self.unit_interval = in_channels, z_channels, unit_interval
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        widths = [ch * m for m in (1, *ch_mult)]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList(_Level(widths[i], widths[i + 1], num_res_blocks, upsample=False)
                                  for i in range(len(ch_mult)))
        self.mid = nn.ModuleList(MaskGitResBlock(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in((x + 1) * 0.5 if self.unit_interval else x)
        for i, level in enumerate(self.down):
            h = level(h, downsample=i < len(self.down) - 1)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGitDecoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, out_channels, h*f, w*f]``, unbounded (trained
    toward [-1, 1]; with ``unit_interval`` the net's own output, trained toward [0, 1] as MaskGIT's and
    TiTok's releases are, is mapped by ``2 y - 1``).

    Args: as :class:`MaskGitEncoder`. ``up[i]`` is the level at ``resolution / 2**i``, run from the
    lowest resolution (``up[-1]``) to the highest (``up[0]``), as stored in the checkpoints.
    """

    def __init__(self, *, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, unit_interval: bool = False) -> None:
        super().__init__()
        _check(ch, ch_mult, num_res_blocks)
        self.out_channels, self.z_channels, self.unit_interval = out_channels, z_channels, unit_interval
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = nn.ModuleList(MaskGitResBlock(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.up = nn.ModuleList(_Level(widths[min(i + 1, len(widths) - 1)], widths[i], num_res_blocks, upsample=i > 0)
                                for i in range(len(ch_mult)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in reversed(self.up):
            h = level(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out * 2 - 1 if self.unit_interval else out
