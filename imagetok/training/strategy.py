"""Data-parallel training of a generator and a discriminator without ``find_unused_parameters``:
replicated (DDP) or sharded (FSDP2).

Lightning's ``DDPStrategy`` wraps the whole LightningModule in one ``DistributedDataParallel``. A GAN
step runs two backward passes that each touch only one network (the generator's loss leaves the
discriminator's weights frozen, the discriminator's loss sees a detached reconstruction), so one
wrapper always waits for gradients that never come, unless ``find_unused_parameters=True`` pays a
graph traversal every step. Here each network gets its own wrapper instead, so every backward reduces
exactly the parameters it produced gradients for, overlapped with the backward pass as usual.

Sharded (``trainer=fsdp``): each network's blocks are ``fully_shard``-ed (FSDP2) over all ranks, which
reduce-scatters whatever gradients a backward produced, so two backward passes per step need nothing
special either. Some tokenizer parameters stay whole on every rank: the quantizer's, because its
forward rewrites the codebook in place (EMA updates, k-means, restarts), which a sharded parameter
would lose; the decoder's last layer, whose gradient the adaptive GAN weight takes with
``autograd.grad``; and the small latent projections between the networks. Their gradients are averaged
by :func:`average_replicated_gradients`. Buffers are not synchronised, hence no BatchNorm (checks.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor


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


def device_count(devices: int | str | list[int] | tuple[int, ...], accelerator: str = "auto") -> int:
    """How many devices per node ``Trainer(devices=..., accelerator=...)`` uses, in any form Lightning
    accepts: ``n`` or ``"n"`` (the first n), ``-1``/``"-1"``/``"auto"`` (all visible GPUs; one process on
    the CPU accelerator), a list of indices ``[0, 1]`` or a comma-separated string ``"0,1"``/``"1,"``
    (that many). Counted here, without Lightning's own parser, which also insists the GPUs exist."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" or text == "-1":
            devices = -1
        elif "," in text:  # Lightning: a comma means a list of indices, "3," is device 3 alone
            devices = [int(x) for x in text.split(",") if x.strip()]
        else:
            devices = int(text)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices == -1:
        return 1 if accelerator == "cpu" else max(1, torch.cuda.device_count())
    return int(devices)


def wants_ddp(strategy: str, devices: int | str | list[int], num_nodes: int, accelerator: str = "auto") -> bool:
    """Whether Lightning would run DDP for these Trainer arguments (``ddp``, or ``auto`` on more than
    one device or node), in which case :class:`GeneratorDiscriminatorDDPStrategy` takes its place."""
    if strategy == "ddp":
        return True
    if strategy != "auto":
        return False
    return num_nodes > 1 or device_count(devices, accelerator) > 1


class ShardedGeneratorDiscriminatorStrategy(ModelParallelStrategy):
    """FSDP2 over every rank of the job (no tensor parallelism), applied network by network by the
    LightningModule's ``configure_model``; checkpoints are assembled on rank 0 into one ordinary file,
    which ``Tokenizer.from_checkpoint`` and a DDP or single-device run read as they read any other."""

    def __init__(self, **kwargs) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The outermost repeated blocks: elements of a ``ModuleList`` that have their own forward (a stack
    of levels or transformer blocks); containers without one are looked into."""
    for child in module.children():
        if not isinstance(child, nn.ModuleList):
            yield from _blocks(child)
            continue
        for member in child:
            if type(member).forward is not nn.Module.forward:
                yield member
            else:
                yield from _blocks(member)


def shard_network(network: nn.Module, mesh, replicated: Iterable[nn.Parameter] = ()) -> int:
    """``fully_shard`` each block of ``network`` (one all-gather per block in forward and backward),
    then the rest of it; the ``replicated`` parameters stay whole, plain tensors on every rank.
    Returns the number of sharded units."""
    from torch.distributed.fsdp import fully_shard

    keep, units = set(replicated), 1
    for block in _blocks(network):
        if not keep.intersection(block.parameters()) and any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
            units += 1
    fully_shard(network, mesh=mesh, ignored_params=keep or None)
    return units


def shard_tokenizer(tokenizer: nn.Module, mesh) -> int:
    """Shard the encoder and the decoder (but its last layer); the quantizer and the 1x1 convs between
    them stay replicated (see the module docstring). Returns the number of sharded units."""
    return (shard_network(tokenizer.encoder, mesh)
            + shard_network(tokenizer.decoder, mesh, replicated=[tokenizer.decoder.last_layer]))


def average_replicated_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of the parameters FSDP does not manage, in one call."""
    grads = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads or not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, value in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(value.view_as(g))


def gradient_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """Total 2-norm of the gradients, over sharded (DTensor) and plain ones alike; one foreach call
    cannot mix the two kinds."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain))
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def clip_gradient_norm(parameters: Iterable[nn.Parameter], max_norm: float,
                       norm: torch.Tensor | None = None) -> torch.Tensor:
    """``clip_grad_norm_`` for a mix of sharded and plain gradients; ``norm``: their total norm when
    already computed (:func:`gradient_norm`). Returns the norm before clipping.

    Plain gradients go through ``torch.nn.utils.clip_grads_with_norm_``, the second half of
    ``clip_grad_norm_`` (bit for bit what Lightning's own clipping does); sharded (DTensor) ones are
    scaled by a Python float, which needs no coefficient laid out as a DTensor."""
    parameters = list(parameters)
    norm = gradient_norm(parameters) if norm is None else norm
    plain = [p for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if plain:
        torch.nn.utils.clip_grads_with_norm_(plain, max_norm, norm.to(plain[0].grad.device))
    sharded = [p.grad for p in parameters if isinstance(p.grad, DTensor)]
    if sharded:
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1 and math.isfinite(scale):
            torch._foreach_mul_(sharded, scale)
    return norm
