"""The one protocol every quantizer family implements.

``forward(z)`` takes latents ``[B, C, *spatial]`` (channels first, as conv nets produce them) or
``[B, N, C]`` (a 1D token sequence, channels last) and returns a :class:`QuantizerOutput`.
``indices_to_latents(indices)`` is the exact inverse of the lookup, and ``codebook_sizes`` gives one
vocabulary size per sub-token, so downstream code never needs to know the family.

Training-time state (codebook initialisation, EMA statistics, dead-code restarts) changes only in a
forward that is both in training mode and has gradients enabled, so ``Tokenizer.encode`` (no_grad)
never mutates a tokenizer, whatever its mode. Statistics are summed over ranks and randomised
decisions are taken on rank 0 and broadcast (``_utils.all_reduce_sum`` / ``broadcast_from_rank0``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    z_q:     quantized latents, same shape and layout as the input ``z``; gradients reach ``z``
             through the straight-through estimator.
    indices: LongTensor ``[B, *spatial, K]`` (or ``[B, N, K]``): K sub-tokens per position.
    loss:    scalar, every auxiliary loss of the quantizer, already weighted.
    metrics: detached scalars for logging (usage, perplexity, commitment, ...).
    features: named non-detached tensors for losses outside the quantizer, e.g. ``"semantic"``
             ``[B, C_s, *spatial]`` features that a teacher-alignment loss compares with a teacher's
             (factorized and dual-codebook families); empty for most families.
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(nn.Module, ABC):
    """Base class: subclasses set ``self.dim`` (channels of the latents they take). ``out_dim`` is
    the channel count of ``z_q``; it equals ``dim`` unless a family changes it (a factorized
    quantizer concatenating its sub-codes, a KL latent taking mean and log-variance)."""

    dim: int

    @property
    def out_dim(self) -> int:
        """Channels of ``z_q`` and of :meth:`indices_to_latents`' output (``dim`` by default)."""
        return self.dim

    @property
    @abstractmethod
    def codebook_sizes(self) -> list[int]:
        """One vocabulary size per sub-token (length K)."""

    def index_shape_for(self, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        """Shape of one image's ``indices`` (without the batch) for latents of spatial size ``latent_hw``;
        the last entry is K. Grid quantizers give ``(h, w, K)``; a family whose tokens are not one grid
        (multi-scale: ``(sum s_k^2, 1)``) overrides this, and raises ``ConfigValueError`` for a size it
        cannot quantize."""
        return (*latent_hw, len(self.codebook_sizes))

    @abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, C, *spatial]`` or ``[B, N, C]`` (float, any range)."""

    @abstractmethod
    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Map ``indices`` ``[B, *spatial, K]`` back to latents ``[B, out_dim, *spatial]``
        (or ``[B, N, C]`` when ``channels_last``), equal to ``z_q`` of the forward pass in eval mode."""
