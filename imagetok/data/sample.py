"""Embedded sample data: real photographs shipped inside scikit-image, cut into crops.

Training and validation crops come from different photographs, so validation PSNR is held-out.
Nothing is downloaded: the files are part of the scikit-image wheel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from imagetok.data.datamodule import CropDataset, ImageDataModule
from imagetok.data.transforms import random_resized_square
from imagetok.errors import check

TRAIN_PHOTOS = ("astronaut", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry", "retina")
VAL_PHOTOS = ("coffee", "chelsea")


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image sample photograph as uint8 ``[3, H, W]``."""
    import skimage.data

    if name == "motorcycle_left":
        array = skimage.data.stereo_motorcycle()[0]
    else:
        array = getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).contiguous()


class SampleDataModule(ImageDataModule):
    """Random crops of scikit-image photographs (for validation too: fixed ones, of other photographs).

    Args:
        train_photos / val_photos: names of ``skimage.data`` photographs (disjoint).
        train_samples: crops per training epoch; val_samples: fixed validation crops.
        scale: side of a crop as a fraction of the photo's shorter side (then resized to image_size).
    """

    def __init__(self, *, image_size: int = 64, batch_size: int = 8, num_workers: int = 0,
                 val_batch_size: int | None = None, train_photos: Sequence[str] = TRAIN_PHOTOS,
                 val_photos: Sequence[str] = VAL_PHOTOS, train_samples: int = 100_000, val_samples: int = 64,
                 scale: Sequence[float] = (0.15, 0.6), seed: int = 0) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         val_batch_size=val_batch_size)
        self.val_crop_name = "random_resized"
        import skimage.data

        for key, names in (("train_photos", train_photos), ("val_photos", val_photos)):
            unknown = [n for n in names if n != "motorcycle_left" and not hasattr(skimage.data, n)]
            check(len(names) > 0 and not unknown, key, list(names), "non-empty list of skimage.data photographs")
        overlap = set(train_photos) & set(val_photos)
        check(not overlap, "val_photos", sorted(overlap), "photographs not also used for training")
        check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "scale", list(scale), "[lo, hi] with 0 < lo <= hi <= 1")
        self.train_photos, self.val_photos = list(train_photos), list(val_photos)
        self.train_samples, self.val_samples = train_samples, val_samples
        self.scale, self.seed = (float(scale[0]), float(scale[1])), seed

    def train_dataset(self) -> CropDataset:
        photos = [load_photo(n) for n in self.train_photos]
        crop = partial(random_resized_square, size=self.image_size, scale=self.scale, flip=True)
        return CropDataset(photos, self.train_samples, crop, self.seed)

    def val_dataset(self) -> CropDataset:
        photos = [load_photo(n) for n in self.val_photos]
        crop = partial(random_resized_square, size=self.image_size, scale=self.scale, flip=False)
        # a different seed stream from training, and the same crops at every validation
        return CropDataset(photos, self.val_samples, crop, seed=10_000 + self.seed, cycle=True)
