"""Finite scalar quantization (FSQ, Mentzer et al. 2023, https://arxiv.org/abs/2309.15505).

No codebook is learned: each of ``d = len(levels)`` channels is squashed into a bounded interval and
rounded to one of ``levels[i]`` values; the implicit codebook is the grid of all combinations, and the
index of a position is the mixed-radix number of its per-channel digits (always ``< prod(levels)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imagetok.errors import check
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput


class FiniteScalarQuantizer(Quantizer):
    """Bounded per-channel rounding with a straight-through gradient; ``indices[..., 1]``.

    Args:
        dim: channels of the incoming latents; when it differs from ``len(levels)`` a linear
            projection maps ``dim -> len(levels)`` before rounding and back after.
        levels: number of values per channel, each >= 2 (e.g. ``[8, 8, 8, 5, 5, 5]`` = 64,000 codes).
        eps: keeps ``tanh`` away from the interval's ends so the top value stays reachable only inside.

    ``z_q`` per channel lies in [-1, 1]: digit ``k`` of a level-``L`` channel maps to
    ``(k - L // 2) / (L // 2)``.
    """

    def __init__(self, *, dim: int, levels: Sequence[int] = (8, 8, 8, 5, 5, 5), eps: float = 1e-3) -> None:
        super().__init__()
        levels = list(levels)
        check(isinstance(dim, int) and dim >= 1, "dim", dim, "a positive integer")
        check(len(levels) >= 1 and all(isinstance(v, int) and v >= 2 for v in levels), "levels", levels,
              "a non-empty list of integers >= 2, e.g. [8, 8, 8, 5, 5, 5]")
        size = 1
        for v in levels:
            size *= v
        check(size < 2**62, "levels", levels, "a grid with fewer than 2**62 codes")
        self.dim, self.levels, self.eps, self.size = dim, levels, eps, size
        projected = dim != len(levels)
        self.project_in = nn.Linear(dim, len(levels)) if projected else nn.Identity()
        self.project_out = nn.Linear(len(levels), dim) if projected else nn.Identity()
        basis = [1]
        for v in levels[:-1]:
            basis.append(basis[-1] * v)
        # constants as buffers so they follow .to(device); not saved (they derive from `levels`)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        # the bound's constants, computed once: a step of FSQ is a handful of small elementwise ops
        levels_t = torch.tensor(levels, dtype=torch.float32)
        half = (levels_t - 1) * (1 + eps) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        self.register_buffer("_half", half, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half), persistent=False)
        self.register_buffer("_half_width_t", torch.div(levels_t, 2, rounding_mode="floor"), persistent=False)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.size]

    def _half_width(self) -> torch.Tensor:
        return self._half_width_t  # L // 2 per channel

    def _bound(self, x: torch.Tensor) -> torch.Tensor:
        """Squash ``x`` ``[T, d]`` so that rounding gives exactly ``L`` integer values per channel,
        ``-(L // 2) .. L - 1 - L // 2`` (even ``L`` are shifted by half a step to stay symmetric)."""
        return torch.tanh(x + self._shift) * self._half - self._offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)
        with U.float32_math(z.device):
            x = self.project_in(tokens.float())  # [T, d]
            bounded = self._bound(x)
            rounded = bounded.round()
            # straight-through: the value is exactly `rounded`, the gradient is bounded's
            q = rounded.detach() + (bounded - bounded.detach())
            digits = (rounded + self._half_width()).long()  # [T, d], digit i in [0, levels[i])
            idx = (digits * self._basis).sum(-1)
            out = self.project_out(q / self._half_width())
        metrics = U.count_statistics(idx, self.size)  # batch usage, perplexity, entropy in bits
        return QuantizerOutput(z_q=restore(out), indices=idx.reshape(*U.index_shape(z), 1),
                               loss=z.new_zeros(()).float(), metrics=metrics)

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        check(indices.shape[-1] == 1, "indices", tuple(indices.shape), "shape [B, *spatial, 1]")
        U.check_index_range(indices, self.size)
        with U.float32_math(indices.device):
            flat = indices.reshape(-1, 1)
            digits = torch.div(flat, self._basis, rounding_mode="floor") % self._levels.long()  # [T, d]
            out = self.project_out((digits - self._half_width()) / self._half_width())
        out = out.reshape(*indices.shape[:-1], self.dim)
        if channels_last:
            return out
        return out.movedim(-1, 1)
