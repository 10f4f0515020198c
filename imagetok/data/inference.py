"""One pass over a split for inference (``evaluate.py``, ``fit_quantizer``, ``tokenize_dataset``), the
same way for indexed datasets (sample, imagefolder) and for streams (webdataset's ``ShardImages``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from imagetok.errors import ConfigValueError


def is_stream(dataset: Dataset) -> bool:
    """Whether ``dataset`` is read in order only (an ``IterableDataset``, no ``len`` or indexing)."""
    return isinstance(dataset, IterableDataset)


def require_indexed(dataset: Dataset, data_target: str, why: str) -> None:
    """Refuse a stream where a command needs images by index, as a one-line :class:`ConfigValueError`
    naming ``data``; ``why`` says what the index is needed for."""
    if is_stream(dataset):
        raise ConfigValueError("data", data_target, f"an indexed dataset (data=sample or data=imagefolder; "
                               f"data=webdataset is a stream without an index order): {why}")


class InferenceImages:
    """Batches ``[B, 3, H, W]`` (float, [-1, 1]) of the first ``num_images`` images of ``dataset`` (all
    of them when None) that fall to this rank, each image on exactly one rank.

    An indexed dataset is split here: rank ``r`` of ``world`` takes images ``r, r + world, ...`` of the
    first ``num_images``. A stream splits itself (``ShardImages`` gives every rank its own shards and
    every DataLoader worker its own part of those), so each rank reads its whole stream and stops after
    its share of ``num_images`` (``num_images // world``, one more on the first ``num_images % world``
    ranks); a rank whose shards hold fewer images yields fewer. Streams may yield single images or
    batches of any size (``ShardImages`` batches in its workers when its ``batch_size`` is set); the
    batches are re-cut here to ``batch_size`` (the last one of a pass may be smaller).

    ``expected``: images this rank yields, ``total``: images all ranks yield together; exact for an
    indexed dataset, upper bounds for a stream (None when a stream is read to its end: unknown until then).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, num_workers: int = 0, num_images: int | None = None,
                 rank: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        if is_stream(dataset):
            self.stream, self.total = True, num_images
            self.expected = None if num_images is None else num_images // world + int(rank < num_images % world)
        else:
            self.stream = False
            self.total = len(dataset) if num_images is None else min(num_images, len(dataset))
            self.dataset = Subset(dataset, range(rank, self.total, world))
            self.expected = len(self.dataset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.stream:
            yield from DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)
            return
        if self.expected == 0:
            return
        limit = self.expected
        # batch_size=None: the stream's items pass through as they come (single images or batches)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
        pending: list[torch.Tensor] = []  # [n_i, 3, H, W] pieces, fewer than batch_size images in all
        held, seen = 0, 0
        for item in loader:
            batch = item.unsqueeze(0) if item.ndim == 3 else item  # [3, H, W] -> [1, 3, H, W]
            if limit is not None:
                batch = batch[: limit - seen]
            seen += batch.shape[0]
            pending.append(batch)
            held += batch.shape[0]
            while held >= self.batch_size:
                joined = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield joined[: self.batch_size]
                rest = joined[self.batch_size :]
                pending, held = ([rest] if rest.shape[0] else []), rest.shape[0]
            if limit is not None and seen >= limit:
                break  # leaves the workers' remaining shards unread
        if held:
            yield torch.cat(pending)
