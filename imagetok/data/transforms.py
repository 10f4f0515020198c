"""Crops for training and evaluation, on uint8 ``[3, H, W]`` tensors; :func:`to_model_range` is the one
place where pixels become the model's float [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` in [0, 255] -> float32 in [-1, 1]."""
    return image.float().div(127.5).sub(1.0)


def _resize(crop: torch.Tensor, size: int) -> torch.Tensor:
    if crop.shape[-1] == size and crop.shape[-2] == size:
        return crop
    out = F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def random_resized_square(image: torch.Tensor, size: int, scale: tuple[float, float], flip: bool,
                          generator: torch.Generator) -> torch.Tensor:
    """A random square whose side is a fraction in ``scale`` of the shorter image side (never smaller
    than ``size`` when the image allows), resized to ``size``; optional horizontal flip. uint8 in/out."""
    _, height, width = image.shape
    short = min(height, width)
    lo, hi = (max(int(s * short), min(size, short)) for s in scale)
    side = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    crop = _resize(image[:, top : top + side, left : left + side], size)
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        crop = crop.flip(-1)
    return crop


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Largest centred square, resized to ``size`` (the usual evaluation crop). uint8 in/out."""
    _, height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _resize(image[:, top : top + side, left : left + side], size)
