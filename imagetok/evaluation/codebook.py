"""Codebook usage counted exactly over a whole split (not a window), per sub-codebook."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Accumulates token counts for each of the K sub-codebooks; ``compute()`` returns the fraction of
    codes used at least once, averaged over sub-codebooks (in [0, 1]). Counts sum across ranks."""

    full_state_update = False

    def __init__(self, codebook_sizes: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.codebook_sizes = list(codebook_sizes)
        self.add_state("counts", default=torch.zeros(sum(self.codebook_sizes), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        """indices: LongTensor ``[..., K]``."""
        offset = 0
        for k, size in enumerate(self.codebook_sizes):
            flat = indices[..., k].reshape(-1)
            self.counts[offset : offset + size] += torch.bincount(flat, minlength=size)
            offset += size

    def per_codebook(self) -> list[torch.Tensor]:
        return list(torch.split(self.counts, self.codebook_sizes))

    def compute(self) -> torch.Tensor:
        return torch.stack([(c > 0).float().mean() for c in self.per_codebook()]).mean()
