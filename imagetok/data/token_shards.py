"""Token shards: a dataset encoded once by a trained tokenizer, for training downstream models.

Layout of a shard directory::

    index.json            tokenizer identity, token shape, dtype, number of images, shard list
    tokens-00000.npy      [n, h, w, K] uint16 (every codebook <= 65,535 entries), int32 (every code
    ...                   < 2^31) or int64 (larger binary sub-tokens, up to 2^62 codes)

Shard ``k`` holds images ``[k * shard_size, (k + 1) * shard_size)`` of the source split in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

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
        if missing:
            raise FileNotFoundError(f"{self.directory}: {len(missing)} shard(s) not written yet (e.g. {missing[:3]}); "
                                    "run tokenize_dataset again to finish them")
        self._arrays: dict[int, np.ndarray] = {}
        self.shard_size = int(self.index["shard_size"])

    def __len__(self) -> int:
        return int(self.index["num_images"])

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._arrays:
            self._arrays[k] = np.load(self.directory / self.index["shards"][k]["file"], mmap_mode="r")
        return self._arrays[k]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"token index {i} out of range for {len(self)} images")
        return torch.from_numpy(np.asarray(self._shard(i // self.shard_size)[i % self.shard_size]).astype(np.int64))

    def all(self) -> torch.Tensor:
        """Every image's tokens, LongTensor ``[N, h, w, K]``."""
        return torch.cat([torch.from_numpy(np.asarray(self._shard(k)).astype(np.int64))
                          for k in range(len(self.index["shards"]))])
