"""How the networks run, not what they are: ``trainer.compile``, ``model.channels_last``,
``model.activation_checkpointing`` and ``optim.fused``. None of these changes the architecture or the
checkpoint keys; results change only by float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from imagetok.nets.transformer import Transformer

log = logging.getLogger(__name__)


def wants(setting: bool | str, device: torch.device) -> bool:
    """``true``/``false``, or ``auto``: on CUDA only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def channels_last(modules: Iterable[nn.Module]) -> None:
    """Store the 4D (convolution) weights of ``modules`` in NHWC order, which cuDNN's convolution
    kernels read without a transpose (with bf16, on tensor cores); other tensors keep their layout."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def contiguous_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every tensor in the default (NCHW) layout: what a checkpoint holds, whatever the
    training layout was, so safetensors export and eager loading never see NHWC strides."""
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def compile_networks(named: dict[str, nn.Module], backend: str = "inductor") -> list[str]:
    """``torch.compile`` each network in place (``nn.Module.compile``: the module keeps its own state
    dict keys, so there are no ``_orig_mod.`` prefixes in checkpoints). The quantizer is left out: its
    k-means, dead-code restarts and index checks are data-dependent Python. Returns the names compiled."""
    for module in named.values():
        module.compile(backend=backend)
    return list(named)


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Recompute every transformer block of ``module`` in the backward pass; returns how many blocks."""
    blocks = 0
    for transformer in module.modules():
        if isinstance(transformer, Transformer):
            transformer.activation_checkpointing = True
            blocks += len(transformer.blocks)
    return blocks


def adamw(parameters: list[nn.Parameter], fused: bool | str = "auto", **kwargs: Any) -> torch.optim.AdamW:
    """AdamW; ``fused`` ``auto``: the fused CUDA kernel (one launch for all tensors) when every
    parameter is a plain CUDA tensor, else torch's default (foreach on CUDA, a loop on CPU). Sharded
    (FSDP2 DTensor) parameters keep the default."""
    if fused == "auto":
        fused = bool(parameters) and all(p.is_cuda and not isinstance(p, DTensor) for p in parameters)
    return torch.optim.AdamW(parameters, fused=bool(fused) or None, **kwargs)
