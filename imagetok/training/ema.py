"""Exponential moving average of a model's weights, used for validation and export.

Kept to the tokenizer alone (not the discriminator or frozen networks), as Lightning's
``EMAWeightAveraging`` would average the whole LightningModule.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``module`` holds the averaged copy. Parameters follow ``p_ema <- d * p_ema + (1 - d) * p`` with
    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages are not dominated by
    the random initialisation; buffers (codebook statistics) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        # num_updates read once (after construction or a checkpoint load), then counted here: reading the
        # buffer every step would wait for the GPU every step.
        self._updates_on_host: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_count)

    def train(self, mode: bool = True) -> "EMA":
        super().train(mode)
        self.module.eval()  # the average is only ever evaluated
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._updates_on_host is None:
            self._updates_on_host = int(self.num_updates)
        self.num_updates += 1
        self._updates_on_host += 1
        n = self._updates_on_host
        decay = min(self.decay, (1 + n) / (10 + n))
        by_kind: dict[type, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e, p in zip(self.module.parameters(), model.parameters()):
            # one foreach call per tensor kind: a sharded (FSDP2 DTensor) and a plain tensor cannot share one
            group = by_kind.setdefault(type(e), ([], []))
            group[0].append(e)
            group[1].append(p.detach().to(e.dtype))
        for ema_params, params in by_kind.values():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def _forget_host_count(module: EMA, incompatible_keys) -> None:
    module._updates_on_host = None  # a checkpoint brought its own num_updates
