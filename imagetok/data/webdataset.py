"""Images from webdataset tar shards (``data/make_shards.py`` writes them), through webdataset's own
pipeline stages: shard lists, tar reading, shuffle buffer, decoding and batching in the DataLoader
workers, ``webdataset.WebLoader`` with a fixed epoch length.

Order: every pass builds its pipeline from ``(seed, epoch, rank, worker)``, so given those the shard
order, the shuffle buffer and the crops are fixed. Lightning passes the epoch through
``loader.sampler.set_epoch``, and a checkpoint holds the position within the epoch (see
:class:`EpochWebLoader`), so a resumed run continues with the batches the interrupted one would have had.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.autodecode import DecodingError
from webdataset.shardlists import expand_urls

from imagetok.data.corrupt import CorruptSampleGuard
from imagetok.data.datamodule import ImageDataModule, batches_to_skip
from imagetok.data.transforms import make_crop, to_model_range, validation_crop_name
from imagetok.errors import ConfigValueError, check

log = logging.getLogger(__name__)


def expand_shard_urls(urls: str | Sequence[str], key: str) -> list[str]:
    """Brace patterns (``shard-{000000..000099}.tar``), ``::``-joined lists or a list of either, expanded
    with webdataset's own expansion. Local files must exist; ``pipe:`` and ``scheme://`` URLs are
    left to the reader."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns for url in expand_urls(str(pattern))]
    check(len(expanded) > 0, key, urls, "a shard path, brace pattern (shard-{000000..000099}.tar) or pipe: command")
    missing = [u for u in expanded if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise ConfigValueError(key, urls, f"existing shard files ({len(missing)} of {len(expanded)} missing, "
                               f"e.g. {missing[0]})")
    return expanded


def distributed_rank_and_world(trainer=None) -> tuple[int, int]:
    """(rank, world size) from the Lightning trainer, else torch.distributed, else RANK/WORLD_SIZE."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def image_of(sample: dict) -> torch.Tensor:
    """The decoded image of a webdataset sample (the first uint8 ``[3, H, W]`` tensor entry)."""
    for value in sample.values():
        if isinstance(value, torch.Tensor) and value.ndim == 3:
            return value
    raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} holds no image "
                     f"(entries: {sorted(k for k in sample if not k.startswith('__'))})")


class ShardImages(IterableDataset):
    """Cropped images from tar shards, as float ``[3, S, S]`` in [-1, 1] (or batches ``[B, 3, S, S]``).

    The shards are taken as given: ``rank``/``world`` come from the main process (DataLoader workers
    started with spawn or forkserver do not see torch.distributed, and Lightning does not set RANK),
    the worker index from the DataLoader.

    Args:
        urls: expanded shard URLs.
        crop: ``crop(uint8 [3, H, W], generator=...) -> uint8 [3, S, S]`` (see :func:`make_crop`).
        resampled: draw shards with replacement, forever, with a seed per (seed, epoch, rank, worker);
            otherwise pass over this rank's (and worker's) shards, ``repeat`` times or forever if None.
        split_by_node / split_by_worker: give each rank / worker every ``world``-th / ``workers``-th shard
            (only without ``resampled``).
        shuffle_buffer: samples held by webdataset's shuffle (0: shard order).
        batch_size: batch in the worker, or None. Batches span passes over the shards (a worker whose
            shards hold fewer images than a batch still fills it); only the last batch of a finite
            stream (``repeat`` not None) can be smaller.
    """

    def __init__(self, urls: list[str], *, crop, rank: int, world: int, guard: CorruptSampleGuard,
                 resampled: bool = False, split_by_node: bool = True, split_by_worker: bool = True,
                 shuffle_buffer: int = 0, batch_size: int | None = None, repeat: int | None = 1, seed: int = 0) -> None:
        super().__init__()
        self.urls, self.crop, self.rank, self.world, self.guard = urls, crop, rank, world, guard
        self.resampled, self.split_by_node, self.split_by_worker = resampled, split_by_node, split_by_worker
        self.shuffle_buffer, self.batch_size, self.repeat, self.seed = shuffle_buffer, batch_size, repeat, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every training epoch start; the epoch seeds shards, shuffle and crops."""
        self.epoch = epoch
        # one line per epoch at INFO (rank 0's); every rank's at DEBUG (hydra.verbose=imagetok.data.webdataset)
        log.log(logging.INFO if self.rank == 0 else logging.DEBUG, "training shards: epoch %d on rank %d of %d",
                epoch, self.rank, self.world)

    def _split_by_rank(self, shards: Iterator[dict]) -> Iterator[dict]:
        return itertools.islice(shards, self.rank, None, self.world)

    def _crop(self, generator: torch.Generator):
        def crop(sample: dict) -> torch.Tensor:
            try:
                return to_model_range(self.crop(image_of(sample), generator=generator))
            except Exception as err:  # name the sample as a decoding failure does, for the guard's log
                raise DecodingError(url=sample.get("__url__"), key=sample.get("__key__"), sample=sample) from err
        return crop

    def samples(self, worker: int) -> wds.DataPipeline:
        """One worker's stream of single cropped images for the current epoch, repeated as ``repeat`` says."""
        seed = wds.utils.make_seed(self.seed, self.epoch, self.rank, worker)
        if self.resampled:
            stages = [wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.urls),
                      self._split_by_rank if self.split_by_node else None,
                      wds.split_by_worker if self.split_by_worker else None,
                      # a new shard order on every pass, from seed + pass
                      wds.detshuffle(len(self.urls), seed=seed) if self.shuffle_buffer > 0 else None]
        # one handler everywhere: an unreadable shard, a bad tar member or an undecodable image is
        # skipped and counted by the guard, which raises once there are too many
        handler = self.guard.webdataset_handler
        stages += [wds.tarfile_to_samples(handler=handler),
                   # shuffled before decoding: the buffer holds encoded bytes, not decoded images
                   wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed))
                   if self.shuffle_buffer > 0 else None,
                   wds.map(self.guard.saw),
                   wds.decode(wds.imagehandler("torchrgb8"), handler=handler),
                   wds.map(self._crop(torch.Generator().manual_seed(seed)), handler=handler)]
        pipeline = wds.DataPipeline(*stages)
        return pipeline.repeat() if self.repeat is None else pipeline.repeat(self.repeat)

    def pipeline(self) -> wds.DataPipeline:
        """This worker's pipeline for the current epoch: :meth:`samples`, batched if ``batch_size``."""
        info = torch.utils.data.get_worker_info()
        samples = self.samples(info.id if info is not None else 0)
        if not self.batch_size:
            return samples
        return wds.DataPipeline(samples, wds.batched(self.batch_size, collation_fn=torch.stack,
                                                     partial=self.repeat is not None))

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.pipeline()
        if self.repeat is None:  # webdataset ends an endless repeat when one pass yields nothing
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            raise RuntimeError(
                f"rank {self.rank} worker {worker}: a pass over its shards gave no readable image (of "
                f"{len(self.urls)} shards in all; resampled={self.resampled}); check the shards, or write more "
                "of them than world_size x num_workers")


class EpochWebLoader(wds.WebLoader):
    """``webdataset.WebLoader`` that hears the epoch and can resume mid-epoch.

    At each epoch start Lightning calls ``loader.sampler.set_epoch(epoch)``; an IterableDataset has
    no sampler, so its dataset stands in. Workers are not persistent, so each epoch's workers get the
    dataset with the new epoch. As :class:`~imagetok.data.datamodule.ResumableDataLoader` does, the
    ``state_dict`` (which Lightning saves with every checkpoint) is the number of batches of this
    epoch handed out; after :meth:`load_state_dict` the next pass leaves that many out. An epoch's
    batches are a function of (seed, epoch, rank), so the resumed run trains on the batches the
    interrupted one would have; they are decoded to be left out, which costs their decoding time.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_served, self.skip_next = 0, 0

    @property
    def sampler(self) -> ShardImages:
        return self.pipeline[0].dataset

    def __iter__(self) -> Iterator[torch.Tensor]:
        skip, self.skip_next = self.skip_next, 0
        self.batches_served = skip
        for batch in itertools.islice(super().__iter__(), skip, None):
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.batches_served, "batch_size": self.sampler.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skip_next = batches_to_skip(state_dict, self.sampler.batch_size, len(self))
        self.batches_served = self.skip_next


class WebDataModule(ImageDataModule):
    """Training and validation images from webdataset shards.

    Args:
        urls / val_urls: shard paths with brace expansion (``/data/shards/shard-{000000..000099}.tar``),
            ``pipe:`` commands (``pipe:aws s3 cp s3://b/shard-{000000..000099}.tar -``), or lists of them.
        resampled: draw training shards with replacement (each rank and worker with its own seed);
            otherwise each rank reads its own shards (``split_by_node``), each worker its own
            (``split_by_worker``), repeated as needed.
        epoch_length: training samples per rank per epoch; every rank runs ``epoch_length // batch_size``
            batches, so DDP ranks never wait on each other at the end of an epoch.
        shuffle_buffer: samples held by the shuffle buffer in each worker (0: no shuffling).
        crop: ``random_resized`` (``scale``, ``flip``), ``center`` or ``adm`` for training.
        val_crop: ``center`` or ``adm`` (guided-diffusion's ``center_crop_arr``) for validation and evaluation.
        max_corrupt_fraction / corrupt_min_seen: see :class:`~imagetok.data.corrupt.CorruptSampleGuard`.
    """

    def __init__(self, *, urls: str | Sequence[str], val_urls: str | Sequence[str], image_size: int = 256,
                 batch_size: int = 8, num_workers: int = 4, val_batch_size: int | None = None,
                 resampled: bool = True, epoch_length: int = 100_000, shuffle_buffer: int = 1000,
                 split_by_node: bool = True, split_by_worker: bool = True, crop: str = "random_resized",
                 scale: Sequence[float] = (0.5, 1.0), flip: bool = True, val_crop: str = "center",
                 max_corrupt_fraction: float = 0.01, corrupt_min_seen: int = 100, seed: int = 0) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         val_batch_size=val_batch_size)
        self.urls, self.val_urls = expand_shard_urls(urls, "urls"), expand_shard_urls(val_urls, "val_urls")
        check(isinstance(epoch_length, int) and epoch_length >= batch_size, "epoch_length", epoch_length,
              f"an integer >= batch_size ({batch_size}): training samples per rank per epoch")
        check(isinstance(shuffle_buffer, int) and shuffle_buffer >= 0, "shuffle_buffer", shuffle_buffer,
              "an integer >= 0")
        self.train_crop = make_crop(crop, image_size, scale, flip)
        self.val_crop_name = validation_crop_name(val_crop)
        self.val_crop = make_crop(val_crop, image_size, key="val_crop")
        CorruptSampleGuard(max_corrupt_fraction, corrupt_min_seen)  # checks both values now, before training
        self.resampled, self.epoch_length, self.shuffle_buffer = resampled, epoch_length, shuffle_buffer
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.max_corrupt_fraction, self.corrupt_min_seen, self.seed = max_corrupt_fraction, corrupt_min_seen, seed

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_length // self.batch_size

    def _guard(self) -> CorruptSampleGuard:
        return CorruptSampleGuard(self.max_corrupt_fraction, self.corrupt_min_seen)

    def _rank_and_world(self) -> tuple[int, int]:
        return distributed_rank_and_world(self.trainer)

    def preflight(self, world: int) -> None:
        """Refuse splits that would leave a rank or a worker without shards (``world``: number of ranks)."""
        workers = max(1, self.num_workers)
        ranks_apart, workers_apart = world if self.split_by_node else 1, workers if self.split_by_worker else 1
        if not self.resampled and len(self.urls) < ranks_apart * workers_apart:
            raise ConfigValueError("data.urls", f"{len(self.urls)} shards", f"at least world_size x num_workers = "
                                   f"{ranks_apart} x {workers_apart} = {ranks_apart * workers_apart} shards with "
                                   "data.resampled=false, so that every rank and worker reads its own; write more "
                                   "shards, lower data.num_workers, or set data.resampled=true")
        if len(self.val_urls) < world:
            raise ConfigValueError("data.val_urls", f"{len(self.val_urls)} shards", f"at least world_size = {world} "
                                   "shards, so that every rank validates on its own shards")

    def train_dataset(self) -> ShardImages:
        rank, world = self._rank_and_world()
        self.preflight(world)
        return ShardImages(self.urls, crop=self.train_crop, rank=rank, world=world, guard=self._guard(),
                           resampled=self.resampled, split_by_node=self.split_by_node,
                           split_by_worker=self.split_by_worker, shuffle_buffer=self.shuffle_buffer,
                           batch_size=self.batch_size, repeat=None, seed=self.seed)

    def val_dataset(self) -> ShardImages:
        """Each validation image once over all ranks, cut by ``val_crop``, in shard order (unbatched)."""
        rank, world = self._rank_and_world()
        self.preflight(world)
        return ShardImages(self.val_urls, crop=self.val_crop, rank=rank, world=world, guard=self._guard())

    def train_dataloader(self) -> EpochWebLoader:
        """``epoch_length // batch_size`` batches ``[B, 3, S, S]`` in [-1, 1] per epoch on every rank."""
        loader = EpochWebLoader(self.train_dataset(), batch_size=None, num_workers=self.num_workers)
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    def val_dataloader(self) -> wds.WebLoader:
        dataset = self.val_dataset()
        dataset.batch_size = self.val_batch_size
        # no more workers than this rank has shards: an idle worker would only add start-up time
        workers = min(self.num_workers, len(self.val_urls[dataset.rank :: dataset.world]))
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
