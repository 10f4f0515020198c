"""Are the weights and quantizer state the same on every rank? A bitwise check after training.

Data-parallel training keeps replicas equal only if every update is: gradients averaged by DDP,
codebook statistics all-reduced, randomised codebook decisions broadcast. A rank that drifted would
silently train a different model than the one rank 0 saves, so the run checks it once at the end.
"""

from __future__ import annotations

import torch
from torch import nn


def state_checksums(module: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names of ``module``'s state-dict tensors and one int64 checksum of each tensor's bytes.

    The checksum weights each byte by its position, so swapped or changed bytes change it: equal
    checksums across ranks mean equal tensors up to a negligible collision chance.
    """
    names, sums = [], []
    for name, tensor in module.state_dict().items():
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).long()
        weights = torch.arange(data.numel(), device=data.device) % 65521 + 1
        names.append(name)
        sums.append((data * weights).sum())
    return names, torch.stack(sums) if sums else torch.zeros(0, dtype=torch.long)


def unsynced_state(module: nn.Module, all_gather) -> list[str]:
    """State-dict names whose tensors differ between ranks (empty when all ranks agree).

    ``all_gather``: ``LightningModule.all_gather``, mapping a tensor ``[n]`` to ``[world_size, n]``.
    """
    names, sums = state_checksums(module)
    gathered = all_gather(sums)
    if gathered.dim() == 1:  # a single process: nothing to compare
        return []
    differs = (gathered != gathered[0]).any(dim=0)
    return [name for name, bad in zip(names, differs.tolist()) if bad]
