"""Differentiable augmentation of discriminator inputs (Zhao et al. 2020, "Differentiable Augmentation for
Data-Efficient GAN Training", https://arxiv.org/abs/2006.10738).

Real and generated images go through the same random transformations (each image its own draw, from the
same distribution) before every discriminator call, in the discriminator's loss and in the generator's;
every operation is differentiable in the image, so the generator still gets gradients. With little data
this keeps the discriminator from memorising the training set. Policies, as in the paper:

* ``translation``: shift by up to 1/8 of the side, per image, filling with zeros;
* ``cutout``: zero a random square of half the side, per image;
* ``color``: random brightness, saturation and contrast, per image.

Images are ``[B, C, H, W]`` in [-1, 1] (the project's range); the output has the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imagetok.errors import check

POLICIES = ("translation", "cutout", "color")


def color(x: torch.Tensor) -> torch.Tensor:
    """Brightness ``+U(-0.5, 0.5)``, saturation ``x U(0, 2)``, contrast ``x U(0.5, 1.5)``, per image."""
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by an integer number of pixels in ``[-ratio*side, ratio*side]``, zero-filled."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row of every output pixel
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)  # [B, 1, H, W]
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    shifted = torch.gather(x.flatten(2), 2, index).view_as(x)  # a gather: gradients reach the source pixels
    return shifted * inside.to(x.dtype)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of ``ratio`` times the side at a random centre of each image (cut at the borders)."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - size_h % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - size_w % 2), (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - cy + size_h // 2  # position inside the square
    cols = torch.arange(w, device=x.device).view(1, 1, w) - cx + size_w // 2
    hole = (rows >= 0) & (rows < size_h) & (cols >= 0) & (cols < size_w)
    return x * (~hole).unsqueeze(1).to(x.dtype)


_OPS = {"translation": translation, "cutout": cutout, "color": color}


class DiffAugment(nn.Module):
    """Apply ``policies`` in order (the paper's order is color, translation, cutout); the identity when
    ``policies`` is empty (then nothing random is drawn either).

    Args:
        policies: a subset of ``("translation", "cutout", "color")``.
    """

    def __init__(self, policies: Sequence[str] = ()) -> None:
        super().__init__()
        policies = list(policies or [])
        check(all(p in POLICIES for p in policies) and len(set(policies)) == len(policies), "diffaug", policies,
              f"a list of distinct names from {list(POLICIES)} (e.g. [translation,cutout,color]; [] = off)")
        # the paper's order, whatever order the list gives
        self.policies = [p for p in ("color", "translation", "cutout") if p in policies]

    @property
    def enabled(self) -> bool:
        return bool(self.policies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.policies:
            x = _OPS[name](x)
        return x.contiguous() if self.policies else x
