"""Codebook usage counted exactly over a whole split (not a window), per sub-codebook, for any
sub-codebook size: binary quantizers reach 2^62 codes per sub-token, so a table of one count per code
is kept only up to :data:`DENSE_LIMIT` codes; larger sub-codebooks keep ``(code, count)`` pairs of the
codes that occur, which are never more than the tokens seen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

DENSE_LIMIT = 2**20  # codes per sub-codebook with a dense table (8 MiB of int64 counts); sparse above
_COMPACT_EVERY = 64  # updates between merges of a sparse sub-codebook's pairs (bounds its memory)


@dataclass
class CodeCounts:
    """Exact counts of the codes one sub-codebook used.

    codes:  LongTensor ``[U]``, the distinct codes used, increasing, each in ``[0, codebook_size)``.
    counts: LongTensor ``[U]``, how often each was used (every entry >= 1).
    """

    codes: torch.Tensor
    counts: torch.Tensor
    codebook_size: int

    def cpu(self) -> CodeCounts:
        return CodeCounts(self.codes.cpu(), self.counts.cpu(), self.codebook_size)

    def dense(self) -> torch.Tensor:
        """Counts of every code, ``[codebook_size]`` (zeros included); only for small codebooks."""
        if self.codebook_size > DENSE_LIMIT:
            raise ValueError(f"a dense table of {self.codebook_size} codes is too large (limit {DENSE_LIMIT})")
        return torch.zeros(self.codebook_size, dtype=torch.long, device=self.codes.device).index_put_(
            (self.codes,), self.counts)


def merge_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` rows ``(code, count)`` with repeated codes -> ``[U, 2]``, one row per distinct code
    (increasing), counts summed."""
    codes, inverse = torch.unique(pairs[:, 0], return_inverse=True)
    counts = torch.zeros_like(codes).index_add_(0, inverse, pairs[:, 1])
    return torch.stack([codes, counts], dim=1)


class CodebookUsage(Metric):
    """Accumulates token counts for each of the K sub-codebooks; ``compute()`` returns the fraction of
    codes used at least once, averaged over sub-codebooks (in [0, 1]). Counts sum across ranks.

    State per sub-codebook ``k``: ``counts_k`` ``[size_k]`` (summed over ranks) while ``size_k`` is at
    most ``dense_limit``, else a list of ``[N, 2]`` LongTensors of ``(code, count)`` rows, ``pairs_k``
    (concatenated over ranks, then merged).
    """

    full_state_update = False

    def __init__(self, codebook_sizes: Sequence[int], dense_limit: int = DENSE_LIMIT, **kwargs) -> None:
        super().__init__(**kwargs)
        self.codebook_sizes = [int(s) for s in codebook_sizes]
        self.dense = [size <= dense_limit for size in self.codebook_sizes]
        for k, (size, dense) in enumerate(zip(self.codebook_sizes, self.dense)):
            if dense:
                self.add_state(f"counts_{k}", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
            else:
                self.add_state(f"pairs_{k}", default=[], dist_reduce_fx="cat")

    def update(self, indices: torch.Tensor) -> None:
        """indices: LongTensor ``[..., K]``, sub-token ``k`` in ``[0, codebook_sizes[k])``."""
        for k, (size, dense) in enumerate(zip(self.codebook_sizes, self.dense)):
            flat = indices[..., k].reshape(-1)
            if dense:
                state = getattr(self, f"counts_{k}")
                state += torch.bincount(flat, minlength=size)
                continue
            codes, counts = torch.unique(flat, return_counts=True)
            pairs = getattr(self, f"pairs_{k}")
            pairs.append(torch.stack([codes, counts], dim=1))
            if len(pairs) >= _COMPACT_EVERY:  # memory bounded by the distinct codes, not by the updates
                setattr(self, f"pairs_{k}", [merge_pairs(torch.cat(pairs))])

    def per_codebook(self) -> list[CodeCounts]:
        """The used codes and their counts, per sub-codebook (this rank's, or all ranks' while synced)."""
        out = []
        for k, (size, dense) in enumerate(zip(self.codebook_sizes, self.dense)):
            if dense:
                counts = getattr(self, f"counts_{k}")
                codes = counts.nonzero().flatten()
                out.append(CodeCounts(codes, counts[codes], size))
                continue
            state = getattr(self, f"pairs_{k}")
            pairs = dim_zero_cat(state) if isinstance(state, torch.Tensor) or len(state) else None
            if pairs is None or pairs.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long, device=self.device)
                out.append(CodeCounts(empty, empty.clone(), size))
                continue
            merged = merge_pairs(pairs.reshape(-1, 2).long())
            out.append(CodeCounts(merged[:, 0], merged[:, 1], size))
        return out

    def compute(self) -> torch.Tensor:
        used = [c.codes.numel() / c.codebook_size for c in self.per_codebook()]
        return torch.tensor(sum(used) / len(used), dtype=torch.float32, device=self.device)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        # A rank without a sparse update would offer torchmetrics' float placeholder to the gather while
        # the others send int64 [N, 2] pairs; an empty int64 [0, 2] tensor keeps dtype and rank equal.
        for k, dense in enumerate(self.dense):
            if not dense and isinstance(getattr(self, f"pairs_{k}"), list) and not getattr(self, f"pairs_{k}"):
                setattr(self, f"pairs_{k}", [torch.zeros(0, 2, dtype=torch.long, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)
