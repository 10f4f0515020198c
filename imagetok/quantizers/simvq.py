"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer", https://arxiv.org/abs/2411.02038).

A plain codebook trained by the codebook loss only moves the codes that were chosen, so most codes of a
large codebook never move and die. SimVQ freezes a random codebook ``C`` ``[K, d]`` and learns one
linear map ``W`` ``[d, d]``: the codes are ``C W``, and every step's codebook gradient moves all of them
at once (the whole latent basis rotates and stretches). Lookup, losses (commitment ``beta ||z - sg(q)||^2``
plus codebook ``||sg(z) - q||^2``, here reaching ``W``), usage statistics, the blocked nearest-code
search and the gradient estimator are those of :class:`VectorQuantizer`; only where the codes come
from differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.quantizers.vq import VectorQuantizer


class SimVectorQuantizer(VectorQuantizer):
    """Frozen random codebook ``C`` through a learned linear map ``W``; ``indices[..., 1]``.

    Args:
        dim: channels of the incoming latents.
        codebook_size: number of codes K.
        codebook_dim: lookup dimension ``d``; when smaller than ``dim`` latents are projected to it and
            back, as in :class:`VectorQuantizer`.
        l2_normalize: normalise latents and the mapped codes ``C W`` to the unit sphere.
        beta: commitment weight.
        gradient: ``"ste"`` or ``"rotation"`` (``_gradients.py``).
        codebook_update, kmeans_init_batches, dead_code_threshold: accepted so that a residual quantizer
            can pass its level options, but only ``"loss"``, 0 and 0 make sense: ``C`` is frozen and
            ``W`` learns by the codebook loss, so there is nothing to average, initialise or restart.
        **vq: other :class:`VectorQuantizer` options (``usage_window``, ``max_search_elements``, ``decay``
            of the usage statistics, ...).

    ``C`` is drawn from ``N(0, 1/d)`` (rows of about unit length) and stored as ``codebook`` with
    ``requires_grad=False``, so checkpoints carry it and the optimizer skips it; ``W`` starts at the
    identity, so the initial codes are ``C`` itself.
    """

    def __init__(self, *, dim: int, codebook_size: int, codebook_dim: int | None = None,
                 codebook_update: str = "loss", kmeans_init_batches: int = 0, dead_code_threshold: float = 0.0,
                 **vq: Any) -> None:
        check(codebook_update == "loss", "codebook_update", codebook_update,
              "'loss' (SimVQ's codebook is frozen; the linear map learns by the codebook loss, no EMA)")
        check(kmeans_init_batches == 0, "kmeans_init_batches", kmeans_init_batches,
              "0 (SimVQ keeps its random codebook frozen; only the linear map learns)")
        check(dead_code_threshold == 0, "dead_code_threshold", dead_code_threshold,
              "0 (SimVQ codes all move with the linear map; there are no codes to restart)")
        super().__init__(dim=dim, codebook_size=codebook_size, codebook_dim=codebook_dim, codebook_update="loss", **vq)
        d = self.codebook_dim
        self.codebook.requires_grad_(False)
        self.codebook.data.copy_(torch.randn(codebook_size, d) * d**-0.5)
        self.linear = nn.Linear(d, d, bias=False)  # W: codes = C W (nn.Linear computes C W^T; its weight is W^T)
        nn.init.eye_(self.linear.weight)

    def _codes(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Mapped codebook ``C W`` ``[K, codebook_dim]`` in ``dtype`` (float32, or float64 for a
        ``.double()`` model), differentiable in ``W`` only."""
        codes = F.linear(self.codebook.to(dtype), self.linear.weight.to(dtype))
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes
