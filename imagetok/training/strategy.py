"""Data-parallel training of a generator and a discriminator without ``find_unused_parameters``.

Lightning's ``DDPStrategy`` wraps the whole LightningModule in one ``DistributedDataParallel``. A GAN
step runs two backward passes that each touch only one network (the generator's loss leaves the
discriminator's weights frozen, the discriminator's loss sees a detached reconstruction), so one
wrapper always waits for gradients that never come, unless ``find_unused_parameters=True`` pays a
graph traversal every step. Here each network gets its own wrapper instead, so every backward reduces
exactly the parameters it produced gradients for, overlapped with the backward pass as usual.
"""

from __future__ import annotations

from typing import Protocol

import torch
from lightning.pytorch.strategies import DDPStrategy


class SeparatelyWrappedModule(Protocol):
    """What the LightningModule offers: it keeps the wrappers outside its ``state_dict``."""

    def wrap_for_data_parallel(self, wrap) -> None: ...

    def unwrap_from_data_parallel(self) -> None: ...


class GeneratorDiscriminatorDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that wraps the module's networks one by one instead of the module as a whole.

    The LightningModule stays unwrapped (``strategy.model is strategy.lightning_module``), so Lightning's
    own manual-optimisation DDP hooks are skipped; the per-network wrappers prepare their reducers in
    their own forward passes.
    """

    def configure_ddp(self) -> None:
        module: SeparatelyWrappedModule = self.model  # type: ignore[assignment]
        module.wrap_for_data_parallel(self._setup_model)

    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and hasattr(module, "unwrap_from_data_parallel"):
            module.unwrap_from_data_parallel()
        super().teardown()


def wants_ddp(strategy: str, devices: int | str | list, num_nodes: int) -> bool:
    """Whether Lightning would run DDP for these Trainer arguments (``ddp``, or ``auto`` on more than
    one device or node), in which case :class:`GeneratorDiscriminatorDDPStrategy` takes its place."""
    if strategy == "ddp":
        return True
    if strategy != "auto":
        return False
    if num_nodes > 1:
        return True
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() > 1
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return count > 1
