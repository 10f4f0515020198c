"""Crops for training and evaluation, on uint8 ``[3, H, W]`` tensors; :func:`to_model_range` is the one
place where pixels become the model's float [-1, 1]."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from imagetok.errors import check

CROPS = ("random_resized", "center")


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


def center_square(image: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Largest centred square, resized to ``size`` (the usual evaluation crop). uint8 in/out.
    ``generator`` is accepted and unused, so that every crop is called the same way."""
    _, height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _resize(image[:, top : top + side, left : left + side], size)


def make_crop(kind: str, size: int, scale: Sequence[float] = (0.5, 1.0), flip: bool = True,
              key: str = "crop") -> Callable[..., torch.Tensor]:
    """The crop named by a data config: ``crop(image, generator=...) -> uint8 [3, size, size]``, picklable
    (DataLoader workers get a copy). ``random_resized``: :func:`random_resized_square` with ``scale``
    and ``flip``; ``center``: :func:`center_square`. The ImageFolder and webdataset datamodules share it."""
    check(kind in CROPS, key, kind, f"one of {list(CROPS)}")
    check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "scale", list(scale), "[lo, hi] with 0 < lo <= hi <= 1")
    if kind == "center":
        return partial(center_square, size=size)
    return partial(random_resized_square, size=size, scale=(float(scale[0]), float(scale[1])), flip=bool(flip))
