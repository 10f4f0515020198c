"""Prefixes of a tokenizer's tokens that decode on their own, for quality against the number of tokens.

Three families have them: a variable-length 1D tokenizer decodes its first ``k`` tokens
(``ids[:, :k]``), residual VQ its first ``d`` levels (``ids[..., :d]``, coarse residuals first), and
VAR's multi-scale quantizer its first ``m`` scales (``ids[:, :s_1^2 + ... + s_m^2]``, coarse to fine).
``evaluate.py`` reports the PSNR of every prefix against the sub-tokens it keeps per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imagetok.quantizers.multiscale import MultiScaleResidualQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.tokenizer import Tokenizer

KINDS = ("tokens", "depth", "scales")


@dataclass(frozen=True)
class TokenPrefix:
    """The first ``n`` tokens (``kind="tokens"``), residual levels (``"depth"``) or scales (``"scales"``)
    of ``of`` in all. ``tokens``: sub-tokens kept per image; ``bits``: their raw capacity (sum of
    log2 codebook sizes)."""

    kind: str
    n: int
    of: int
    tokens: int
    bits: float
    length: int = 0  # "scales": the sequence positions the first n scales take

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, *token_shape]`` -> the prefix's indices, which ``Tokenizer.decode`` takes."""
        if self.kind == "tokens":
            return indices[:, : self.n]
        if self.kind == "depth":
            return indices[..., : self.n]
        return indices[:, : self.length]

    @property
    def label(self) -> str:
        if self.kind == "tokens":
            return f"first {self.n} tokens"
        what = "levels" if self.kind == "depth" else "scales"
        return f"first {self.n} of {self.of} {what} ({self.tokens} tokens)"

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "n": self.n, "of": self.of, "tokens": self.tokens, "bits": self.bits,
                "label": self.label}


def token_prefixes(tokenizer: Tokenizer, image_size: int, counts: list[int]) -> list[TokenPrefix]:
    """The prefixes to measure: ``counts`` (first-k token counts, already checked) for a variable-length
    1D tokenizer; every depth ``1..D`` of a residual quantizer; every number of scales ``1..M`` of a
    multi-scale one; none for other tokenizers."""
    sizes = tokenizer.codebook_sizes
    quantizer = tokenizer.quantizer
    if tokenizer.variable_length:
        n = tokenizer.encoder.num_latent_tokens
        per_token = sum(math.log2(s) for s in sizes)
        return [TokenPrefix("tokens", k, n, k * len(sizes), k * per_token) for k in counts]
    if isinstance(quantizer, ResidualVectorQuantizer):
        positions = math.prod(tokenizer.token_shape(image_size)[:-1])
        depth = len(sizes)
        return [TokenPrefix("depth", d, depth, positions * d, positions * sum(math.log2(s) for s in sizes[:d]))
                for d in range(1, depth + 1)]
    if isinstance(quantizer, MultiScaleResidualQuantizer):
        scales = list(quantizer.scales)
        lengths = [sum(s * s for s in scales[:m]) for m in range(1, len(scales) + 1)]
        return [TokenPrefix("scales", m, len(scales), length, length * math.log2(sizes[0]), length)
                for m, length in enumerate(lengths, start=1)]
    return []
