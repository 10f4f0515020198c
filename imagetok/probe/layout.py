"""How a shard directory's tokens become the probe's sequence of positions.

Every layout is read as ``L`` positions of ``K`` sub-tokens, ``[B, L, K]``:

- ``grid``: ``[h, w, K]`` in raster order (row by row), ``L = h * w``;
- ``sequence``: 1D latent tokens ``[N, K]``, ``L = N``;
- ``multiscale``: VAR's ``[sum s^2, 1]``, already coarse to fine (the token maps of scales ``s_1 < ...``
  one after another, each in raster order), ``L = sum s^2``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

LAYOUTS = ("grid", "sequence", "multiscale")


@dataclass(frozen=True)
class TokenLayout:
    """``kind`` (one of :data:`LAYOUTS`), the shards' ``token_shape`` (last entry ``K``), one vocabulary
    size per sub-token, VAR's ``scales`` (multiscale only) and the source images' side in pixels."""

    kind: str
    token_shape: tuple[int, ...]
    codebook_sizes: tuple[int, ...]
    scales: tuple[int, ...] | None = None
    image_size: int | None = None

    @classmethod
    def from_index(cls, index: dict[str, Any], scales: list[int] | None = None) -> "TokenLayout":
        """From a shard directory's index.json; ``scales`` stands in for ``index["scales"]`` of shards
        written before it was recorded (taken from the tokenizer)."""
        shape = tuple(int(n) for n in index["token_shape"])
        scales = index.get("scales", scales)
        kind = "grid" if len(shape) == 3 else "multiscale" if scales else "sequence"
        image_size = (index.get("data") or {}).get("image_size")
        return cls(kind, shape, tuple(int(v) for v in index["codebook_sizes"]),
                   tuple(scales) if kind == "multiscale" else None, int(image_size) if image_size else None)

    @property
    def positions(self) -> int:
        """``L``: positions per image (each holding ``K`` sub-tokens)."""
        return math.prod(self.token_shape[:-1])

    @property
    def subtokens(self) -> int:
        """``K``: sub-tokens per position."""
        return self.token_shape[-1]

    def to_sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shard items ``[B, *token_shape]`` -> ``[B, L, K]`` (raster order for grids; sequences as they are)."""
        return tokens.reshape(tokens.shape[0], self.positions, self.subtokens)

    def from_sequence(self, sequence: torch.Tensor) -> torch.Tensor:
        """``[B, L, K]`` -> ``[B, *token_shape]``, what ``Tokenizer.decode`` takes."""
        return sequence.reshape(sequence.shape[0], *self.token_shape)

    def describe(self) -> str:
        shape = "x".join(map(str, self.token_shape))
        extra = f", scales {list(self.scales)}" if self.scales else ""
        return f"{self.kind} {shape} ({self.positions} positions x {self.subtokens} sub-token(s){extra})"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
