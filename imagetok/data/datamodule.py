"""The datamodule interface every data source implements: train and validation datasets of images
``[3, H, W]`` float in [-1, 1], served by plain DataLoaders."""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from imagetok.data.transforms import to_model_range
from imagetok.errors import check

log = logging.getLogger(__name__)


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


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` that can leave out the first batches of its next pass: a resumed run continues
    mid-epoch without loading the batches it already trained on. Skipping happens on index lists,
    after any data-parallel split of ``sampler``, so each rank skips its own batches."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip_next = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip_next = self.skip_next, 0
        return islice(super().__iter__(), skip, None)


def batches_to_skip(state_dict: dict[str, int], batch_size: int, batches_per_pass: int) -> int:
    """Batches of the current pass that a loader leaves out after a resume.

    ``state_dict``: a loader's saved position, ``{"batches_served": n, "batch_size": b}``; ``batch_size``
    and ``batches_per_pass`` describe the loader now. A changed batch size leaves out the same number
    of samples (``n * b // batch_size`` batches); a finished pass leaves out nothing, as Lightning then
    moves on to the next epoch, which is a fresh pass.
    """
    served, saved_batch_size = int(state_dict["batches_served"]), int(state_dict["batch_size"])
    if saved_batch_size != batch_size:
        served = served * saved_batch_size // batch_size
        log.warning("resuming with batch size %d instead of %d: leaving out %d batches of the current pass",
                    batch_size, saved_batch_size, served)
    return served if served < batches_per_pass else 0


class ResumableDataLoader(DataLoader):
    """A plain ``DataLoader`` whose ``state_dict`` is the number of batches of the current pass it has
    handed out; Lightning saves it with every checkpoint (it saves any loader with ``state_dict``)
    and loads it before the loader's first pass after a resume, which then starts where the
    interrupted run stopped. Lightning's own loop state restores the epoch (``set_epoch``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_served = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: the batch sampler's pass (and any skip) begins at the first batch requested.
        self.batches_served = self.batch_sampler.skip_next if isinstance(self.batch_sampler, ResumableBatchSampler) else 0
        for batch in super().__iter__():
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.batches_served, "batch_size": self._batch_size()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(f"cannot resume mid-epoch: the batch sampler {type(self.batch_sampler).__name__} cannot skip batches")
        self.batch_sampler.skip_next = batches_to_skip(state_dict, self._batch_size(), len(self.batch_sampler))
        self.batches_served = self.batch_sampler.skip_next

    def _batch_size(self) -> int:
        return int(getattr(self.batch_sampler, "batch_size", None) or self.batch_size or 1)


class ImageDataModule(L.LightningDataModule):
    """Shared loader settings; subclasses provide :meth:`train_dataset` and :meth:`val_dataset`, and
    name their validation crop in ``val_crop_name`` (a key of ``transforms.CROP_DESCRIPTIONS``), which
    ``evaluate.py`` records with its numbers."""

    val_crop_name: str | None = None  # None: not said (recorded as such)

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

    def train_dataloader(self) -> DataLoader:
        """Batches of ``train_dataset()``, which must be a :class:`CropDataset`: its order and crops are a
        function of ``(seed, epoch)``, so a resumed run continues with the batches it would have had.
        A stream overrides this method instead (see ``WebDataModule``)."""
        dataset = self.train_dataset()
        if not isinstance(dataset, CropDataset):
            raise TypeError(f"{type(self).__name__}.train_dataset() returned a {type(dataset).__name__}; "
                            "train_dataloader needs a CropDataset, whose batches resume exactly")
        seed = dataset.seed
        sampler = EpochShuffleSampler(dataset)
        # Own generator: creating an iterator draws the worker base seed from it, not from the global
        # stream the training step uses (which a resume restores; see training/rng_state.py).
        return ResumableDataLoader(dataset, batch_sampler=ResumableBatchSampler(sampler, self.batch_size, drop_last=True),
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   generator=torch.Generator().manual_seed(seed))

    def val_dataloader(self) -> DataLoader:
        # Own generator as well: Lightning creates this iterator before on_validation_start, so a draw
        # from the global stream there would escape RandomState's bracketing of validation.
        return DataLoader(self.val_dataset(), batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(0))
