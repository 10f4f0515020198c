"""VQGAN-family convolutional encoder and decoder (Esser et al. 2021, https://arxiv.org/abs/2012.09841).

The downsampling factor is ``2 ** (len(ch_mult) - 1)``. LlamaGen's VQ-16 and taming's f16 VQGAN are
both members: ``ch=128, ch_mult=[1,1,2,2,4], num_res_blocks=2, attn_resolutions=[16], z_channels=256``
at 256x256 (see ``configs/experiment/``). So are diffusers' ``VQModel`` nets (aMUSEd's VQ-GAN, Patil et
al. 2024, https://arxiv.org/abs/2401.01808, with ``norm_groups``) and, with the decoder's norms
conditioned on the quantized latent (``condition_channels``), MoVQ's (Zheng et al. 2022,
https://arxiv.org/abs/2209.09002; Kandinsky 2.2 / 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.nets.blocks import Level, MidBlock, group_norm, make_norm


IMAGETOK_RANGE = (-1.0, 1.0)  # the pixel range of images inside imagetok (see imagetok/tokenizer.py)


def _pixel_range(pixel_range: Sequence[float]) -> tuple[float, float]:
    valid = (isinstance(pixel_range, (list, tuple)) and len(pixel_range) == 2
             and all(isinstance(v, (int, float)) for v in pixel_range) and pixel_range[0] < pixel_range[1])
    check(valid, "pixel_range", pixel_range, "[low, high] with low < high, e.g. [-1, 1] (imagetok's) or [0, 1]")
    return float(pixel_range[0]), float(pixel_range[1])


def _check_common(ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int, dropout: float,
                  norm_groups: int | None = None) -> None:
    check(isinstance(ch, int) and ch >= 1, "ch", ch, "a positive integer")
    check(len(ch_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in ch_mult), "ch_mult", list(ch_mult),
          "a non-empty list of positive integers, e.g. [1, 2, 2, 4]")
    check(isinstance(num_res_blocks, int) and num_res_blocks >= 1, "num_res_blocks", num_res_blocks, "an integer >= 1")
    factor = 2 ** (len(ch_mult) - 1)
    check(isinstance(resolution, int) and resolution >= factor and resolution % factor == 0, "resolution", resolution,
          f"a multiple of the downsampling factor {factor} (= 2**(len(ch_mult)-1))")
    check(0.0 <= dropout < 1.0, "dropout", dropout, "a float in [0, 1)")
    if norm_groups is not None:
        widths = sorted({ch * m for m in (1, *ch_mult)})
        check(isinstance(norm_groups, int) and norm_groups >= 1 and all(w % norm_groups == 0 for w in widths),
              "norm_groups", norm_groups, f"null or a positive integer dividing every width {widths}")


class Encoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> latents ``[B, z_channels, H/f, W/f]``.

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per resolution level; ``f = 2**(len(ch_mult)-1)``.
        num_res_blocks: residual blocks per level.
        attn_resolutions: feature-map sizes (relative to ``resolution``) whose blocks get attention.
        z_channels: output channels.
        resolution: training image size, used only to place attention.
        mid_attention: attention between the two middle residual blocks.
        norm_groups: groups of every GroupNorm; None: 32 where the width allows, else fewer (diffusers:
            ``norm_num_groups``, used as given).
        pixel_range: the pixel range the weights expect; images arrive in imagetok's [-1, 1] and are
            mapped linearly onto it first (aMUSEd's VQ-GAN works on [0, 1]). Default: no mapping.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), z_channels: int = 256,
                 dropout: float = 0.0, resolution: int = 256, mid_attention: bool = True,
                 norm_groups: int | None = None, pixel_range: Sequence[float] = IMAGETOK_RANGE) -> None:
        super().__init__()
        _check_common(ch, ch_mult, num_res_blocks, resolution, dropout, norm_groups)
        self.in_channels, self.z_channels, self.pixel_range = in_channels, z_channels, _pixel_range(pixel_range)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch * m for m in (1, *ch_mult)]
        levels, res = [], resolution
        for i in range(len(ch_mult)):
            last = i == len(ch_mult) - 1
            levels.append(Level(widths[i], widths[i + 1], num_res_blocks, res in attn_resolutions, dropout,
                                None if last else "down", norm_groups))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(widths[-1], mid_attention, dropout, norm_groups)
        self.norm_out = group_norm(widths[-1], norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixel_range != IMAGETOK_RANGE:
            low, high = self.pixel_range
            x = low + (x + 1) * ((high - low) / 2)  # [-1, 1] -> [low, high]
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, out_channels, h*f, w*f]``, unbounded (trained
    toward [-1, 1]). Mirrors :class:`Encoder`, with ``num_res_blocks + 1`` blocks per level.

    ``condition_channels``: every norm becomes a :class:`~imagetok.nets.blocks.SpatialNorm` conditioned on
    the quantized latent ``zq`` ``[B, condition_channels, h, w]`` (MoVQ; the latent before
    ``post_quant_conv``), and ``forward(z, zq)`` needs it (:class:`~imagetok.tokenizer.Tokenizer` passes it
    when :attr:`conditioned_on_quantized`). None (default): GroupNorm, ``forward(z)``.
    ``pixel_range``: the range the weights produce, mapped back to imagetok's [-1, 1] (see :class:`Encoder`).
    """

    def __init__(self, *, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), z_channels: int = 256,
                 dropout: float = 0.0, resolution: int = 256, mid_attention: bool = True,
                 norm_groups: int | None = None, condition_channels: int | None = None,
                 pixel_range: Sequence[float] = IMAGETOK_RANGE) -> None:
        super().__init__()
        _check_common(ch, ch_mult, num_res_blocks, resolution, dropout, norm_groups)
        self.pixel_range = _pixel_range(pixel_range)
        check(condition_channels is None or (isinstance(condition_channels, int) and condition_channels >= 1),
              "condition_channels", condition_channels, "null or a positive integer (the quantized latent's channels)")
        self.out_channels, self.z_channels, self.condition_channels = out_channels, z_channels, condition_channels
        norms = {"num_groups": norm_groups, "condition_channels": condition_channels}
        widths = [ch * m for m in ch_mult]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], mid_attention, dropout, **norms)
        levels, in_ch = [], widths[-1]
        for i in reversed(range(len(ch_mult))):  # lowest resolution first
            levels.append(Level(in_ch, widths[i], num_res_blocks + 1, res in attn_resolutions, dropout,
                                "up" if i > 0 else None, **norms))
            in_ch, res = widths[i], res * 2
        # stored highest-resolution first, as in VQGAN checkpoints (up[0] is the full-size level)
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = make_norm(widths[0], **norms)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight

    @property
    def conditioned_on_quantized(self) -> bool:
        """Whether :meth:`forward` takes the quantized latent too (spatial norms)."""
        return self.condition_channels is not None

    def forward(self, z: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioned_on_quantized and zq is None:
            raise ValueError("this decoder's norms are conditioned on the quantized latent: call decoder(z, zq)")
        cond = () if zq is None or not self.conditioned_on_quantized else (zq,)
        h = self.mid(self.conv_in(z), *cond)
        for level in reversed(self.up):
            h = level(h, *cond)
        out = self.conv_out(F.silu(self.norm_out(h, *cond)))
        if self.pixel_range != IMAGETOK_RANGE:
            low, high = self.pixel_range
            out = (out - low) * (2 / (high - low)) - 1  # [low, high] -> [-1, 1]
        return out
