"""MAGVIT-v2-style convolutional encoder and decoder (Yu et al. 2023, https://arxiv.org/abs/2310.05737),
as Open-MAGVIT2 (TencentARC SEED-Voken) builds it for its LFQ tokenizers.

Differences from the VQGAN nets in ``cnn.py``:

* no attention anywhere, and the middle is ``num_res_blocks`` plain residual blocks;
* residual-block convolutions carry no bias (each is followed by a GroupNorm or the residual sum);
* the encoder downsamples with a stride-2 3x3 conv with symmetric padding 1, ends with a 1x1 ``conv_out``;
* the decoder upsamples with a 3x3 conv to ``4C`` channels and a depth-to-space rearrangement, has
  ``num_res_blocks`` (not ``+1``) blocks per level, and starts every level with an adaptive GroupNorm
  whose scale and shift are predicted from per-channel statistics of the quantized latent.

Module names follow Open-MAGVIT2's checkpoints (``down.i.block.j``, ``down.i.downsample``, ``mid_block.j``,
``adaptive.i.gamma/beta``, ``up.i.block.j``, ``up.i.upsample``), so converting is a key filter.
Defaults are Open-MAGVIT2's published 256px "L" tokenizer: ``ch=128, ch_mult=[1,1,2,2,4],
num_res_blocks=4, z_channels=18``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from imagetok.errors import check
from imagetok.nets.blocks import ResnetBlock, group_norm


def _check_widths(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int) -> None:
    check(isinstance(ch, int) and ch >= 1, "ch", ch, "a positive integer")
    check(len(ch_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in ch_mult), "ch_mult", list(ch_mult),
          "a non-empty list of positive integers, e.g. [1, 1, 2, 2, 4]")
    check(isinstance(num_res_blocks, int) and num_res_blocks >= 1, "num_res_blocks", num_res_blocks, "an integer >= 1")
    check(isinstance(z_channels, int) and z_channels >= 1, "z_channels", z_channels, "a positive integer")


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then a per-sample scale and shift predicted from the
    quantized latent: ``gamma(std_hw(z)) * GN(x) + beta(mean_hw(z))``.

    ``x`` ``[B, C, H, W]``, ``z`` ``[B, z_channels, h, w]`` -> ``[B, C, H, W]``. The standard deviation
    is ``sqrt(var + eps)`` with the unbiased (``n - 1``) variance over the ``h * w`` positions, as
    Open-MAGVIT2 computes it (so a 1x1 latent gives NaN there too; MAGVIT-v2 latents are 16x16).
    """

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(group_norm(channels).num_groups, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2)  # [B, z_channels, h*w]
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())[..., None, None]
        shift = self.beta(flat.mean(dim=-1))[..., None, None]
        return scale * self.gn(x) + shift


class DepthToSpaceUpsample(nn.Module):
    """3x3 conv ``C -> 4C``, then depth-to-space: ``[B, C, H, W] -> [B, C, 2H, 2W]``.

    The channel of output pixel ``(2h + i, 2w + j)``, channel ``c`` is ``(2i + j) * C + c`` (the
    "DCR" order of TensorFlow's ``depth_to_space``), not ``c * 4 + 2i + j`` as ``F.pixel_shuffle``
    reads it; the order matters for converted weights."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.conv(x), "b (i j c) h w -> b c (h i) (w j)", i=2, j=2)


class _Level(nn.Module):
    """Residual blocks of one resolution (``block``), then an optional ``downsample`` / ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: nn.Module | None,
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, bias=False)
                                   for i in range(num_blocks))
        if resample is not None:
            self.add_module(resample_name, resample)


class Magvit2Encoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> latents ``[B, z_channels, H/f, W/f]``,
    ``f = 2**(len(ch_mult) - 1)``.

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per resolution level.
        num_res_blocks: residual blocks per level, and in the middle.
        z_channels: output channels (Open-MAGVIT2: the LFQ bits, 18 for 2^18 codes).
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 4, z_channels: int = 18) -> None:
        super().__init__()
        _check_widths(ch, ch_mult, num_res_blocks, z_channels)
        self.in_channels, self.z_channels = in_channels, z_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        widths = [ch * m for m in (1, *ch_mult)]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            _Level(widths[i], widths[i + 1], num_res_blocks,
                   nn.Conv2d(widths[i + 1], widths[i + 1], 3, stride=2, padding=1) if i < len(ch_mult) - 1 else None,
                   "downsample")
            for i in range(len(ch_mult)))
        self.mid_block = nn.ModuleList(ResnetBlock(widths[-1], widths[-1], bias=False) for _ in range(num_res_blocks))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Magvit2Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, out_channels, h*f, w*f]``, unbounded (trained
    toward [-1, 1]). Every level, lowest resolution first, starts with an :class:`AdaptiveGroupNorm`
    conditioned on the decoder's input latent ``z``; ``h * w`` must be at least 2 (see there)."""

    def __init__(self, *, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 4, z_channels: int = 18) -> None:
        super().__init__()
        _check_widths(ch, ch_mult, num_res_blocks, z_channels)
        self.out_channels, self.z_channels = out_channels, z_channels
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid_block = nn.ModuleList(ResnetBlock(widths[-1], widths[-1], bias=False) for _ in range(num_res_blocks))
        # level i (i = 0 at full resolution) takes the width of level i + 1 (the top width for the last)
        inputs = [*widths[1:], widths[-1]]
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(z_channels, inputs[i]) for i in range(len(ch_mult)))
        self.up = nn.ModuleList(
            _Level(inputs[i], widths[i], num_res_blocks, DepthToSpaceUpsample(widths[i]) if i > 0 else None, "upsample")
            for i in range(len(ch_mult)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i](h, z)
            for block in self.up[i].block:
                h = block(h)
            if hasattr(self.up[i], "upsample"):
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
