"""Building blocks of the VQGAN-family conv nets. Parameter names follow the layout shared by
taming-transformers and LlamaGen checkpoints (``norm1``, ``conv1``, ``nin_shortcut``, ``q/k/v``,
``proj_out``) so that converting their weights is a key rename, not a reshuffle.

Every norm is a GroupNorm, or, with ``condition_channels``, a :class:`SpatialNorm` conditioned on the
quantized latent (MoVQ); blocks then take that latent as an extra input, ``block(x, zq)``, and pass it
to their norms (``*cond`` below: empty for plain GroupNorm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, num_groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm (eps 1e-6, affine) with ``num_groups`` groups; None: 32 as in VQGAN, falling back to
    fewer for the narrow nets used on CPU."""
    if num_groups is None:
        num_groups = 32 if channels % 32 == 0 else max(g for g in (16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned normalisation (Zheng et al. 2022, https://arxiv.org/abs/2209.09002):
    ``GN(f) * conv_y(zq) + conv_b(zq)``, with the quantized latent ``zq`` nearest-upsampled to ``f``'s size,
    so each position's scale and shift come from the code that covers it.

    ``f`` ``[B, C, H, W]``, ``zq`` ``[B, zq_channels, h, w]`` (``H, W`` multiples of ``h, w``) -> ``[B, C, H, W]``.
    The GroupNorm keeps its affine parameters (applied before the modulation), as MoVQ's does."""

    def __init__(self, channels: int, zq_channels: int, num_groups: int | None = None) -> None:
        super().__init__()
        self.norm_layer = group_norm(channels, num_groups)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


def make_norm(channels: int, num_groups: int | None = None, condition_channels: int | None = None) -> nn.Module:
    """:func:`group_norm`, or a :class:`SpatialNorm` on a ``condition_channels``-channel latent."""
    if condition_channels is None:
        return group_norm(channels, num_groups)
    return SpatialNorm(channels, condition_channels, num_groups)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected) skip. ``[B, C_in, H, W] -> [B, C_out, H, W]``.

    ``bias=False`` drops the convolutions' biases (MAGVIT-v2's blocks have none: each conv is followed
    by a GroupNorm or a residual sum that makes a bias redundant). ``num_groups`` / ``condition_channels``:
    see :func:`make_norm`; ``forward(x, *cond)`` hands ``cond`` (the latent of a spatial norm) to both norms."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, bias: bool = True,
                 num_groups: int | None = None, condition_channels: int | None = None) -> None:
        super().__init__()
        self.norm1 = make_norm(in_channels, num_groups, condition_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = make_norm(out_channels, num_groups, condition_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=bias) if in_channels != out_channels
                             else None)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, *cond)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, *cond))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, residual. Shape-preserving.
    ``num_groups`` / ``condition_channels``: the norm, see :func:`make_norm`."""

    def __init__(self, channels: int, num_groups: int | None = None, condition_channels: int | None = None) -> None:
        super().__init__()
        self.norm = make_norm(channels, num_groups, condition_channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        h = self.norm(x, *cond)
        _, _, height, _ = x.shape
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) padding: ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then an optional
    resampler (``downsample`` in the encoder, ``upsample`` in the decoder). ``forward(x, *cond)``: see
    :class:`ResnetBlock`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
                 dropout: float, resample: str | None, num_groups: int | None = None,
                 condition_channels: int | None = None) -> None:
        super().__init__()
        norms = {"num_groups": num_groups, "condition_channels": condition_channels}
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout, **norms) for i in range(num_blocks)
        )
        self.attn = (nn.ModuleList(AttnBlock(out_channels, **norms) for _ in range(num_blocks)) if attention
                     else nn.ModuleList())
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x, *cond)
            if len(self.attn):
                x = self.attn[i](x, *cond)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """Res -> (attention) -> Res at the lowest resolution. ``forward(x, *cond)``: see :class:`ResnetBlock`."""

    def __init__(self, channels: int, attention: bool, dropout: float, num_groups: int | None = None,
                 condition_channels: int | None = None) -> None:
        super().__init__()
        norms = {"num_groups": num_groups, "condition_channels": condition_channels}
        self.block_1 = ResnetBlock(channels, channels, dropout, **norms)
        self.attn_1 = AttnBlock(channels, **norms) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, **norms)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        h = self.block_1(x, *cond)
        if isinstance(self.attn_1, AttnBlock):
            h = self.attn_1(h, *cond)
        return self.block_2(h, *cond)
