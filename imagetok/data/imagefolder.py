"""Images from a directory tree: ``root/train/**`` and ``root/val/**`` (ImageNet layout)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagetok.data.corrupt import CorruptSampleGuard, ImageLoadError
from imagetok.data.datamodule import CropDataset, ImageDataModule
from imagetok.data.transforms import make_crop, validation_crop_name
from imagetok.errors import ConfigValueError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path: Path) -> torch.Tensor:
    """Image file -> uint8 ``[3, H, W]`` (RGB)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFiles:
    """Lazily read image files, indexable like a list of uint8 ``[3, H, W]`` tensors.

    With a ``guard``, an unreadable file is skipped: counted, logged with its path, and replaced by the
    next readable file in the list (deterministically, so a batch keeps its size); ``guard`` raises
    once too many are bad. Without one, the first unreadable file raises :class:`ImageLoadError`.
    """

    def __init__(self, files: Sequence[Path], guard: CorruptSampleGuard | None = None) -> None:
        self.files, self.guard = list(files), guard
        self.bad: set[int] = set()  # known-bad indices in this process: warned about once

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.guard is None:
            return read_image(self.files[index])
        for offset in range(len(self.files)):
            which = (index + offset) % len(self.files)
            if which in self.bad:
                continue
            self.guard.saw()
            try:
                return read_image(self.files[which])
            except ImageLoadError as err:
                self.bad.add(which)
                self.guard.skip(str(self.files[which]), err)
        raise ImageLoadError(f"no readable image among the {len(self.files)} files, e.g. {self.files[0]}")


def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_classes(directory: Path) -> tuple[list[int], list[str]] | None:
    """Class labels of the files :func:`list_images` lists, in that order: the class of a file is its
    first subdirectory under ``directory`` (``root/train/<class>/.../x.jpg``, ImageNet's layout), ids
    ``0..C-1`` in sorted class-name order. None when any image lies directly in ``directory`` (no classes).

    A lookup beside the datasets, which yield images only: ``tokenize_dataset`` uses it to write labels
    next to the token shards. An unreadable file that :class:`ImageFiles` replaces by the next readable
    one keeps the label of the file it replaces."""
    relative = [p.relative_to(directory).parts for p in list_images(directory)]
    if not relative or any(len(parts) < 2 for parts in relative):
        return None
    names = sorted({parts[0] for parts in relative})
    ids = {name: i for i, name in enumerate(names)}
    return [ids[parts[0]] for parts in relative], names


class ImageFolderDataModule(ImageDataModule):
    """Training: one random resized crop per image per epoch. Validation: one fixed crop of each image.

    Args:
        root: directory holding ``train/`` and ``val/`` subdirectories of images (any nesting).
        crop: training crop, ``random_resized`` (``scale``: crop side as a fraction of the shorter image
            side; ``flip``), ``center`` or ``adm``; the same crops as the webdataset datamodule.
        val_crop: validation and evaluation crop, ``center`` (the largest centred square, resized) or
            ``adm`` (guided-diffusion's ``center_crop_arr``, the crop behind LlamaGen's and GigaTok's
            ImageNet numbers; see :func:`~imagetok.data.transforms.adm_center_crop`).
        max_corrupt_fraction / corrupt_min_seen: unreadable files are skipped until this fraction
            (see :class:`~imagetok.data.corrupt.CorruptSampleGuard`).
    """

    def __init__(self, *, root: str, image_size: int = 256, batch_size: int = 8, num_workers: int = 4,
                 val_batch_size: int | None = None, crop: str = "random_resized", scale: Sequence[float] = (0.5, 1.0),
                 flip: bool = True, val_crop: str = "center", max_corrupt_fraction: float = 0.01,
                 corrupt_min_seen: int = 100, seed: int = 0) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         val_batch_size=val_batch_size)
        self.train_crop = make_crop(crop, image_size, scale, flip)
        self.val_crop_name = validation_crop_name(val_crop)
        self.val_crop = make_crop(val_crop, image_size, key="val_crop")
        CorruptSampleGuard(max_corrupt_fraction, corrupt_min_seen)  # checks both values now, before training
        self.max_corrupt_fraction, self.corrupt_min_seen = max_corrupt_fraction, corrupt_min_seen
        self.root = Path(str(root)).expanduser()
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise ConfigValueError("root", str(root), f"an existing directory containing '{split}/' with images "
                                       f"({self.root / split} does not exist)")
        self.seed = seed

    def _files(self, split: str) -> ImageFiles:
        files = list_images(self.root / split)
        if not files:
            raise ConfigValueError("root", str(self.root), f"a tree whose '{split}/' holds images {IMAGE_EXTENSIONS}")
        return ImageFiles(files, CorruptSampleGuard(self.max_corrupt_fraction, self.corrupt_min_seen))

    def train_dataset(self) -> CropDataset:
        files = self._files("train")
        return CropDataset(files, len(files), self.train_crop, self.seed, cycle=True)

    def val_dataset(self) -> CropDataset:
        files = self._files("val")
        return CropDataset(files, len(files), self.val_crop, 0, cycle=True)
