"""The datamodule interface every data source implements: train and validation datasets of images
``[3, H, W]`` float in [-1, 1], served by plain DataLoaders."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imagetok.data.transforms import to_model_range
from imagetok.errors import check


class CropDataset(Dataset):
    """``length`` samples, each a crop of one of ``source``'s images. Sample ``i`` is a pure function
    of ``(seed, i)``, so the number of workers does not change the data. With ``cycle``, sample ``i``
    crops image ``i % len(source)``, and indices past ``length`` (see :class:`EpochShuffleSampler`)
    give the same images with new crops.

    Args:
        source: indexable images (uint8 ``[3, H, W]``), ``len(source)`` of them.
        crop: ``crop(image, generator=...) -> uint8 [3, size, size]``.
    """

    def __init__(self, source, length: int, crop, seed: int, cycle: bool = False) -> None:
        self.source, self.length, self.crop, self.seed, self.cycle = source, length, crop, seed, cycle

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        which = index % len(self.source) if self.cycle else int(torch.randint(len(self.source), (1,), generator=generator))
        return to_model_range(self.crop(self.source[which], generator=generator))


class EpochShuffleSampler(Sampler[int]):
    """A new permutation of ``range(len(dataset))`` every pass, each index offset by ``pass * len``,
    so a :class:`CropDataset` draws fresh crops every epoch while the order stays a pure function of
    ``(dataset.seed, epoch)``. Lightning calls :meth:`set_epoch`; without it, passes count themselves.
    """

    def __init__(self, dataset: CropDataset) -> None:
        self.size, self.seed, self.epoch = len(dataset), dataset.seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        order = torch.randperm(self.size, generator=generator) + self.epoch * self.size
        self.epoch += 1
        return iter(order.tolist())


class ImageDataModule(L.LightningDataModule):
    """Shared loader settings; subclasses provide :meth:`train_dataset` and :meth:`val_dataset`."""

    def __init__(self, *, image_size: int, batch_size: int, num_workers: int = 0, val_batch_size: int | None = None) -> None:
        super().__init__()
        check(isinstance(image_size, int) and image_size >= 8, "image_size", image_size, "an integer >= 8")
        check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
        check(isinstance(num_workers, int) and num_workers >= 0, "num_workers", num_workers, "an integer >= 0")
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size

    @abstractmethod
    def train_dataset(self) -> Dataset: ...

    @abstractmethod
    def val_dataset(self) -> Dataset: ...

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = EpochShuffleSampler(dataset) if shuffle and isinstance(dataset, CropDataset) else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, drop_last=shuffle, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), self.val_batch_size, shuffle=False)
