"""The indices of an evaluation split's first images, kept whole for the statistics that read token
sequences (:mod:`imagetok.evaluation.token_language`) rather than counts; capped, since a split's
counts take constant memory but its sequences grow with every image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from imagetok.quantizers._utils import world_size


class TokenSample:
    """Keeps the indices ``[B, ..., K]`` of the first ``max_images`` images (None: all of them) read
    over all ranks, on the CPU, as int32 while every code fits (half of int64's memory: 10,000 images
    of 256 tokens are 10 MB per sub-token), else int64.

    Under ``torch.distributed`` each rank keeps its first ``ceil(max_images / world)`` images and
    :meth:`gathered` puts rank ``r``'s ``j``-th image at ``r + j * world``: the split's own order for an
    indexed split (rank ``r`` reads images ``r, r + world, ...``), so the kept images and every
    statistic of them are those of a single process; a stream's ranks read their own shards, whose
    images are then interleaved the same way."""

    def __init__(self, max_images: int | None, codebook_sizes: Sequence[int]) -> None:
        self.world = world_size()
        self.max_images = max_images
        self.per_rank = None if max_images is None else -(-max_images // self.world)
        self.dtype = torch.int32 if max(codebook_sizes) - 1 <= torch.iinfo(torch.int32).max else torch.int64
        self.parts: list[torch.Tensor] = []
        self.kept = 0

    def update(self, indices: torch.Tensor) -> None:
        """indices: LongTensor ``[B, ..., K]`` of the next ``B`` images this rank read."""
        room = indices.shape[0] if self.per_rank is None else self.per_rank - self.kept
        if room <= 0:
            return
        part = indices[:room].detach().to("cpu", self.dtype)
        self.parts.append(part)
        self.kept += part.shape[0]

    def gathered(self) -> torch.Tensor | None:
        """Every rank's kept indices, LongTensor ``[M, ..., K]`` in image order (M at most
        ``max_images``); None when no rank kept any. A collective: every rank calls it."""
        mine = torch.cat(self.parts) if self.parts else None
        if self.world > 1:
            parts: list[torch.Tensor | None] = [None] * self.world
            torch.distributed.all_gather_object(parts, mine)
        else:
            parts = [mine]
        order = [torch.arange(p.shape[0]) * self.world + r for r, p in enumerate(parts) if p is not None]
        kept = [p for p in parts if p is not None]
        if not kept:
            return None
        position = torch.cat(order).argsort()
        indices = torch.cat(kept)[position].long()
        return indices if self.max_images is None else indices[: self.max_images]
