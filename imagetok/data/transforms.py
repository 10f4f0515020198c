"""Crops for training and evaluation, on uint8 ``[3, H, W]`` tensors; :func:`to_model_range` is the one
place where pixels become the model's float [-1, 1]. :data:`CROP_DESCRIPTIONS` says what each does, in the
words ``evaluate.py`` records with its numbers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from imagetok.errors import check

CROPS = ("random_resized", "center", "adm")
CROP_DESCRIPTIONS = {
    "random_resized": "a random square (its side a fraction of the shorter image side), resized to the image size "
                      "(bilinear, antialiased); at evaluation fixed per image index",
    "center": "the largest centred square, resized to the image size (bilinear, antialiased)",
    "adm": "guided-diffusion's center_crop_arr (ADM, Dhariwal & Nichol 2021; LlamaGen's and GigaTok's ImageNet "
           "validation crop): halve with PIL BOX while the shorter side >= 2x the size, PIL BICUBIC to the "
           "shorter side = size, centre crop",
}


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


def adm_center_crop(image: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The evaluation crop of guided-diffusion (``center_crop_arr`` in ``guided_diffusion/image_datasets.py``;
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021), with which LlamaGen and
    GigaTok cut ImageNet validation images (and write the reference statistics) for ADM's FID evaluator.
    uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``; ``generator`` is unused (every crop is called alike).

    On a PIL image, as published: while the shorter side is at least ``2 * size``, halve both sides
    (``(w // 2, h // 2)``, ``Image.BOX``); then resize both sides by ``scale = size / shorter side`` to
    ``round(side * scale)`` (``Image.BICUBIC``); then cut the centre square, top ``(H - size) // 2``,
    left ``(W - size) // 2``. The halving first is why it differs from a single antialiased resize:
    box filtering by powers of two, then bicubic over less than a factor of two."""
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), resample=Image.BICUBIC)
    array = np.asarray(pil)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return torch.from_numpy(array[top : top + size, left : left + size].copy()).permute(2, 0, 1).contiguous()


VALIDATION_CROPS = ("center", "adm")  # deterministic: the same pixels at every validation and evaluation


def validation_crop_name(kind: str) -> str:
    """``kind`` if it is one of :data:`VALIDATION_CROPS`, else a :class:`ConfigValueError` for ``val_crop``."""
    check(kind in VALIDATION_CROPS, "val_crop", kind, f"one of {list(VALIDATION_CROPS)}")
    return kind


def make_crop(kind: str, size: int, scale: Sequence[float] = (0.5, 1.0), flip: bool = True,
              key: str = "crop") -> Callable[..., torch.Tensor]:
    """The crop named by a data config: ``crop(image, generator=...) -> uint8 [3, size, size]``, picklable
    (DataLoader workers get a copy). ``random_resized``: :func:`random_resized_square` with ``scale``
    and ``flip``; ``center``: :func:`center_square`; ``adm``: :func:`adm_center_crop`. The ImageFolder and
    webdataset datamodules share it (``key``: the config key named in an error)."""
    check(kind in CROPS, key, kind, f"one of {list(CROPS)}")
    check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "scale", list(scale), "[lo, hi] with 0 < lo <= hi <= 1")
    if kind == "center":
        return partial(center_square, size=size)
    if kind == "adm":
        return partial(adm_center_crop, size=size)
    return partial(random_resized_square, size=size, scale=(float(scale[0]), float(scale[1])), flip=bool(flip))
