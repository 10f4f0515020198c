"""Learning-rate schedules: linear warm-up, then cosine decay to ``min_lr_ratio`` or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at generator step ``step``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def scaled_lr(lr: float, rule: str, global_batch: int, base_batch_size: int | None) -> float:
    """``lr`` (set for a global batch of ``base_batch_size``) scaled to ``global_batch`` images per
    step: ``none`` keeps it, ``linear`` multiplies by the batch ratio, ``sqrt`` by its square root."""
    if rule == "none":
        return lr
    ratio = global_batch / base_batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))
