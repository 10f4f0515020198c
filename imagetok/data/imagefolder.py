"""Images from a directory tree: ``root/train/**`` and ``root/val/**`` (ImageNet layout)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagetok.data.datamodule import CropDataset, ImageDataModule
from imagetok.data.transforms import center_square, random_resized_square
from imagetok.errors import ConfigValueError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageLoadError(RuntimeError):
    """An image file is missing, truncated or not an image; the message names the file."""


def read_image(path: Path) -> torch.Tensor:
    """Image file -> uint8 ``[3, H, W]`` (RGB)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFiles:
    """Lazily read image files, indexable like a list of uint8 ``[3, H, W]`` tensors."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_image(self.files[index])


def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataModule(ImageDataModule):
    """Training: one random resized crop per image per epoch. Validation: the centre square of each image.

    Args:
        root: directory holding ``train/`` and ``val/`` subdirectories of images (any nesting).
        scale: crop side as a fraction of the shorter image side for training crops.
    """

    def __init__(self, *, root: str, image_size: int = 256, batch_size: int = 8, num_workers: int = 4,
                 val_batch_size: int | None = None, scale: Sequence[float] = (0.5, 1.0), seed: int = 0) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         val_batch_size=val_batch_size)
        self.root = Path(str(root)).expanduser()
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise ConfigValueError("root", str(root), f"an existing directory containing '{split}/' with images "
                                       f"({self.root / split} does not exist)")
        self.scale, self.seed = (float(scale[0]), float(scale[1])), seed

    def _files(self, split: str) -> ImageFiles:
        files = list_images(self.root / split)
        if not files:
            raise ConfigValueError("root", str(self.root), f"a tree whose '{split}/' holds images {IMAGE_EXTENSIONS}")
        return ImageFiles(files)

    def train_dataset(self) -> CropDataset:
        files = self._files("train")
        crop = partial(random_resized_square, size=self.image_size, scale=self.scale, flip=True)
        return CropDataset(files, len(files), crop, self.seed, cycle=True)

    def val_dataset(self) -> CropDataset:
        files = self._files("val")
        return CropDataset(files, len(files), lambda image, generator: center_square(image, self.image_size), 0, cycle=True)
