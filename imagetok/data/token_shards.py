"""Token shards: a dataset encoded once by a trained tokenizer, for training downstream models.

Layout of a shard directory::

    index.json            tokenizer identity, token shape, dtype, number of images, shard list; with
                          class labels also ``num_classes`` and ``label_names``
    tokens-00000.npy      [n, *token_shape] uint16 (every codebook <= 65,535 entries), int32 (every
    ...                   code < 2^31) or int64 (larger binary sub-tokens, up to 2^62 codes)
    labels-00000.npy      [n] int64 class ids in [0, num_classes), only when the source had classes
    ...

Shard ``k`` holds images ``[k * shard_size, (k + 1) * shard_size)`` of the source split in order.
``token_shape`` is ``[h, w, K]`` for grid tokenizers (raster order), ``[N, K]`` for 1D latent tokens and
``[sum s^2, 1]`` for the multi-scale (VAR) one, whose index.json also lists its ``scales``.

:class:`TokenShardDataModule` serves a train and a validation directory to a downstream model (the AR
probe, ``imagetok/probe/``): shuffled, split by rank and DataLoader worker, resumable mid-epoch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from imagetok.data.datamodule import batches_to_skip
from imagetok.errors import ConfigValueError, check

INDEX_NAME = "index.json"


def token_dtype(codebook_sizes: list[int]) -> np.dtype:
    """The shards' dtype, by the largest code ``max(codebook_sizes) - 1``: uint16 while no codebook
    exceeds 65,535 entries (as the downstream convention asks; a 65,536-entry codebook would still fit,
    but is stored as int32 like every larger one), int32 while every code is below 2^31, else int64
    (binary sub-tokens of 32 to 62 bits, whose codes would overflow int32)."""
    largest = max(codebook_sizes)
    if largest <= 65_535:
        return np.dtype(np.uint16)
    return np.dtype(np.int32) if largest - 1 <= np.iinfo(np.int32).max else np.dtype(np.int64)


def shard_name(k: int) -> str:
    return f"tokens-{k:05d}.npy"


def label_shard_name(k: int) -> str:
    """The class labels of shard ``k`` (int64 ``[n]``), next to its tokens."""
    return f"labels-{k:05d}.npy"


class TokenShards(Dataset):
    """Reads a shard directory back: item ``i`` is a LongTensor ``[h, w, K]`` (the tokens of image ``i``).
    Shards are memory-mapped, so opening a large directory costs nothing until items are read."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory} has no {INDEX_NAME}: not a token shard directory")
        self.index = json.loads(index_path.read_text())
        missing = [s["file"] for s in self.index["shards"] if not (self.directory / s["file"]).is_file()]
        if self.has_labels:
            missing += [label_shard_name(k) for k in range(len(self.index["shards"]))
                        if not (self.directory / label_shard_name(k)).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.directory}: {len(missing)} shard(s) not written yet (e.g. {missing[:3]}); "
                                    "run tokenize_dataset again to finish them")
        self._arrays: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        self.shard_size = int(self.index["shard_size"])

    @property
    def has_labels(self) -> bool:
        """Whether the shards carry class labels (``labels-NNNNN.npy``; older directories never do)."""
        return self.index.get("num_classes") is not None

    @property
    def num_classes(self) -> int | None:
        return int(self.index["num_classes"]) if self.has_labels else None

    @property
    def token_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.index["token_shape"])

    def __len__(self) -> int:
        return int(self.index["num_images"])

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._arrays:
            self._arrays[k] = np.load(self.directory / self.index["shards"][k]["file"], mmap_mode="r")
        return self._arrays[k]

    def _label_shard(self, k: int) -> np.ndarray:
        if k not in self._labels:
            self._labels[k] = np.load(self.directory / label_shard_name(k), mmap_mode="r")
        return self._labels[k]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"token index {i} out of range for {len(self)} images")
        return torch.from_numpy(np.asarray(self._shard(i // self.shard_size)[i % self.shard_size]).astype(np.int64))

    def read(self, items: np.ndarray) -> dict[str, torch.Tensor]:
        """The items ``items`` (int array ``[B]``) at once: ``{"tokens": LongTensor [B, *token_shape]}``, plus
        ``"labels"`` (LongTensor ``[B]``) when the shards have labels. One fancy index per shard touched
        (ascending within the shard, which a memory map reads fastest); the batch keeps the order of ``items``."""
        items = np.asarray(items, dtype=np.int64)
        shard_of, row_of = items // self.shard_size, items % self.shard_size
        tokens = np.empty((len(items), *self.token_shape), dtype=np.int64)
        labels = np.empty(len(items), dtype=np.int64) if self.has_labels else None
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            ascending = where[np.argsort(row_of[where], kind="stable")]
            rows = row_of[ascending]
            tokens[ascending] = self._shard(int(k))[rows]
            if labels is not None:
                labels[ascending] = self._label_shard(int(k))[rows]
        out = {"tokens": torch.from_numpy(tokens)}
        if labels is not None:
            out["labels"] = torch.from_numpy(labels)
        return out

    def all_labels(self) -> torch.Tensor:
        """Every image's class id, LongTensor ``[N]`` (only when :attr:`has_labels`)."""
        return torch.cat([torch.from_numpy(np.asarray(self._label_shard(k)).astype(np.int64))
                          for k in range(len(self.index["shards"]))])

    def all(self) -> torch.Tensor:
        """Every image's tokens, LongTensor ``[N, h, w, K]``."""
        return torch.cat([torch.from_numpy(np.asarray(self._shard(k)).astype(np.int64))
                          for k in range(len(self.index["shards"]))])


def open_shard_directory(directory: str | Path | None, key: str) -> TokenShards:
    """:class:`TokenShards` of ``directory``, with every way it can be wrong as one
    :class:`ConfigValueError` naming ``key`` (missing, not a shard directory, empty, unfinished)."""
    allowed = "a token shard directory written by tokenize_dataset (index.json and tokens-NNNNN.npy)"
    check(directory not in (None, ""), key, directory, allowed)
    path = Path(str(directory)).expanduser()
    if not path.is_dir():
        raise ConfigValueError(key, str(directory), f"{allowed}; {path} does not exist")
    if not (path / INDEX_NAME).is_file():
        raise ConfigValueError(key, str(directory), f"{allowed}; {path} has no {INDEX_NAME}")
    try:
        shards = TokenShards(path)
    except FileNotFoundError as err:
        raise ConfigValueError(key, str(directory), f"{allowed}; {err}") from None
    check(len(shards) > 0, key, str(directory), f"{allowed}, holding at least one image (its {INDEX_NAME} lists none)")
    return shards


class ShardBatches(IterableDataset):
    """Batches of one shard directory for one rank, in an order that is a pure function of
    ``(seed, epoch, rank, world)``, whatever the number of DataLoader workers.

    Order: a seeded global permutation of all items per epoch (``shuffle``), not shard order plus a
    shuffle within shards: items are a few hundred bytes each and memory-mapped, so random reads cost
    little, and every batch then mixes the whole dataset. Rank ``r`` of ``world`` takes items
    ``r, r + world, ...`` of the permutation (with ``drop_last`` the permutation is first cut to a
    multiple of ``world``, so that every rank runs the same number of batches, as DDP needs), cuts them
    into batches of ``batch_size``, and DataLoader worker ``w`` of ``W`` reads batches ``skip + w,
    skip + w + W, ...``, which the DataLoader hands out round-robin, i.e. in batch order. Batches
    ``< skip`` are not read (a resumed run's first pass). Items: dicts as :meth:`TokenShards.read` returns.
    """

    def __init__(self, shards: TokenShards, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.shards, self.batch_size, self.shuffle, self.drop_last = shards, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (through ``loader.sampler``, see :class:`ShardBatchLoader`)."""
        self.epoch = epoch

    def items_of_rank(self, epoch: int) -> np.ndarray:
        """This rank's item indices for pass ``epoch``, int64 ``[n_rank]``."""
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: n // self.world * self.world]
        return order[self.rank :: self.world]

    def batches(self, epoch: int) -> list[np.ndarray]:
        items = self.items_of_rank(epoch)
        stop = len(items) // self.batch_size * self.batch_size if self.drop_last else len(items)
        return [items[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self) -> int:
        n_rank = len(self.items_of_rank(0))
        return n_rank // self.batch_size if self.drop_last else -(-n_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b, items in enumerate(self.batches(self.epoch)):
            # counted from the first batch served, so that the DataLoader's round-robin over workers
            # (worker 0 first) hands the batches out in order after a skip too
            if b >= self.skip and (b - self.skip) % workers == worker:
                yield self.shards.read(items)


class ShardBatchLoader:
    """The loader Lightning iterates: batches of a :class:`ShardBatches`, through a DataLoader with
    ``num_workers`` workers (not persistent: each pass's workers get the dataset with that pass's epoch
    and skip). Like :class:`~imagetok.data.datamodule.ResumableDataLoader`, its ``state_dict`` (saved by
    Lightning with every checkpoint) is the number of batches of this pass handed out, and after
    :meth:`load_state_dict` the next pass leaves that many out, without reading them. Lightning finds
    ``set_epoch`` on ``loader.sampler``, which is the dataset here (as in ``EpochWebLoader``)."""

    def __init__(self, dataset: ShardBatches, num_workers: int = 0) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.batches_served, self.skip_next = 0, 0

    @property
    def sampler(self) -> ShardBatches:
        return self.dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip, self.skip_next = self.skip_next, 0
        self.dataset.skip, self.batches_served = skip, skip
        workers = min(self.num_workers, max(0, len(self) - skip))
        # Own generator: starting workers draws their base seed from it, not from the global stream.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, generator=torch.Generator().manual_seed(0))
        for batch in loader:
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.batches_served, "batch_size": self.dataset.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skip_next = batches_to_skip(state_dict, self.dataset.batch_size, len(self))
        self.batches_served = self.skip_next


class TokenShardDataModule(L.LightningDataModule):
    """Training and validation token batches from two shard directories (``tokenize_dataset split=train``
    and ``split=val``), which must come from the same tokenizer (``tokenizer_sha256``) and hold the
    same token layout; a mismatch is one :class:`ConfigValueError` before anything trains.

    Training batches: shuffled per epoch, split by rank and worker, every rank the same number of
    full batches (see :class:`ShardBatches`), resumable mid-epoch (:class:`ShardBatchLoader`).
    Validation: every item once over all ranks, in order, the last batch possibly smaller.

    Args:
        train_dir / val_dir: the shard directories (config keys ``tokens`` / ``val_tokens``).
        batch_size: per rank; ``val_batch_size`` defaults to it.
    """

    def __init__(self, *, train_dir: str | Path, val_dir: str | Path, batch_size: int = 32,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check(isinstance(batch_size, int) and batch_size >= 1, "data.batch_size", batch_size, "an integer >= 1")
        check(isinstance(num_workers, int) and num_workers >= 0, "data.num_workers", num_workers, "an integer >= 0")
        self.train = open_shard_directory(train_dir, "tokens")
        self.val = open_shard_directory(val_dir, "val_tokens")
        for key in ("tokenizer_sha256", "token_shape", "codebook_sizes"):
            if self.train.index.get(key) != self.val.index.get(key):
                raise ConfigValueError("val_tokens", str(val_dir), f"shards of the same tokenizer as tokens={train_dir} "
                                       f"(their {INDEX_NAME} {key} differ: {str(self.train.index.get(key))[:16]} vs "
                                       f"{str(self.val.index.get(key))[:16]})")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        check(len(self.train) >= batch_size, "data.batch_size", batch_size,
              f"at most the {len(self.train)} training items of tokens={train_dir}")

    @property
    def index(self) -> dict[str, Any]:
        """The training shards' index.json."""
        return self.train.index

    def _rank_and_world(self) -> tuple[int, int]:
        from imagetok.data.webdataset import distributed_rank_and_world

        return distributed_rank_and_world(getattr(self, "trainer", None))

    def train_dataloader(self) -> ShardBatchLoader:
        rank, world = self._rank_and_world()
        check(len(self.train) // world >= self.batch_size, "data.batch_size", self.batch_size,
              f"at most {len(self.train) // world}: {len(self.train)} training items over {world} rank(s)")
        dataset = ShardBatches(self.train, self.batch_size, shuffle=True, drop_last=True, seed=self.seed,
                               rank=rank, world=world)
        return ShardBatchLoader(dataset, self.num_workers)

    def val_dataloader(self) -> ShardBatchLoader:
        rank, world = self._rank_and_world()
        dataset = ShardBatches(self.val, self.val_batch_size, shuffle=False, drop_last=False, rank=rank, world=world)
        return ShardBatchLoader(dataset, self.num_workers)
