"""Multi-scale residual quantization (the VQVAE of VAR, Tian et al. 2024, https://arxiv.org/abs/2404.02905).

A latent map ``f`` ``[B, C, h, w]`` is explained coarse to fine by token maps of growing size
``s_1 < ... < s_K = h``: at scale ``k`` the residual ``f - f_hat`` is area-downsampled to ``s_k x s_k``
and quantized with ONE codebook shared by all scales; the code map is upsampled back to ``h x w``,
refined by a 3x3 convolution ``phi`` blended with its input (``(1 - r) x + r conv(x)``, a few convs
shared across scales) and added to ``f_hat``. The tokens are the concatenated token maps in
coarse-to-fine order, ``sum(s_k^2)`` per image: the sequence VAR's next-scale transformer predicts,
and every prefix of whole scales decodes to a coarser latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import ConfigValueError, check
from imagetok.quantizers import _gradients as G
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.vq import VectorQuantizer


def refiner_of_scale(num_scales: int, num_refiners: int) -> list[int | None]:
    """Which refiner ``phi`` each of ``num_scales`` scales uses (VAR's ``PhiPartiallyShared``), or None
    for every scale when ``num_refiners`` is 0.

    Scale ``k`` sits at ``k / (K - 1)`` on ``[0, 1]`` (a single scale at 1, the finest) and takes the
    refiner whose tick is nearest. VAR places ``n`` ticks evenly from ``1 / (3n)`` to ``1 - 1 / (3n)``
    when ``n = 4`` (its setting) and at the bin centres ``(j + 1/2) / n`` otherwise. The distances are
    computed as VAR does (numpy float64 ``linspace``, ``argmin``), because a schedule can put a scale
    exactly halfway between two ticks and only the rounding decides: VAR's 10 scales put scale 2 at
    2/9, halfway between 1/12 and 13/36, and it takes refiner 1. VAR's 10 scales with 4 refiners give
    ``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]``.
    """
    if num_refiners == 0:
        return [None] * num_scales
    margin = 1 / (3 * num_refiners) if num_refiners == 4 else 1 / (2 * num_refiners)
    ticks = np.linspace(margin, 1 - margin, num_refiners)
    positions = [k / (num_scales - 1) if num_scales > 1 else 1.0 for k in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - p))) for p in positions]


class MultiScaleResidualQuantizer(Quantizer):
    """VAR's multi-scale residual quantizer; indices ``[B, sum(s_k^2), 1]`` (one shared codebook).

    Args:
        dim: channels of the incoming latents (also the code dimension: VAR looks codes up in the
            latent space itself, so ``codebook_dim`` projections are refused).
        codebook_size: codes in the shared codebook (VAR: 4096).
        scales: side lengths ``s_1 < ... < s_K`` of the token maps; the last one must equal the latent
            size (square latents), e.g. ``[1, 2, 3, 4, 6, 8]`` for 8x8 latents (VAR at 16x16:
            ``[1, 2, 3, 4, 5, 6, 8, 10, 13, 16]``, 680 tokens).
        num_refiners: convolutions ``phi`` shared across the scales (VAR: 4); scale ``k`` uses the one
            whose tick is nearest to ``k / (K - 1)`` (see :func:`refiner_of_scale`). 0 disables refinement.
        refine_ratio: ``r`` in ``phi(x) = (1 - r) x + r conv3x3(x)`` (VAR: 0.5).
        upsample: interpolation of code maps to the latent size, ``"bicubic"`` (VAR) or ``"bilinear"``.
        beta: commitment weight of VAR's loss (below).
        gradient: estimator from ``f_hat`` back to ``f``, ``"ste"`` (VAR) or ``"rotation"`` (``f`` rotated
            onto ``f_hat`` at each position; ``_gradients.py``).
        **vq: other :class:`VectorQuantizer` options for the shared codebook (``codebook_update``,
            ``decay``, ``kmeans_init_batches``, ``dead_code_threshold``, ``usage_window``, ...). The
            codebook is called once per scale, so its statistics (EMA, ``step``, usage window,
            k-means pooling) count calls: ``K`` per training step.

    Loss, as VAR: after each scale ``k``, ``beta * ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2``
    (mean squared errors over the full latent map), averaged over the ``K`` scales. The first term
    commits the encoder, the second trains the codebook (with ``codebook_update=loss``) and the
    ``phi`` convolutions. ``z_q = f_hat_K`` with a straight-through gradient to ``f``.
    """

    def __init__(self, *, dim: int, codebook_size: int, scales: Sequence[int] = (1, 2, 3, 4, 6, 8),
                 num_refiners: int = 4, refine_ratio: float = 0.5,
                 upsample: Literal["bicubic", "bilinear"] = "bicubic", beta: float = 0.25, gradient: str = "ste",
                 **vq: Any) -> None:
        super().__init__()
        G.check_gradient(gradient)
        scales = list(scales)
        check(len(scales) >= 1 and all(isinstance(s, int) and s >= 1 for s in scales)
              and all(a < b for a, b in zip(scales, scales[1:])), "scales", scales,
              "a non-empty, strictly increasing list of positive integers ending in the latent size, e.g. [1, 2, 3, 4, 6, 8]")
        check(isinstance(num_refiners, int) and num_refiners >= 0, "num_refiners", num_refiners, "an integer >= 0")
        check(0.0 <= refine_ratio <= 1.0, "refine_ratio", refine_ratio, "a float in [0, 1]")
        check(upsample in ("bicubic", "bilinear"), "upsample", upsample, "'bicubic' or 'bilinear'")
        check(beta >= 0, "beta", beta, "a non-negative float")
        check(not vq.get("l2_normalize", False), "l2_normalize", True,
              "false: residuals shrink scale by scale, unit-norm codes cannot follow them")
        check(vq.get("codebook_dim") in (None, dim), "codebook_dim", vq.get("codebook_dim"),
              "null (codes live in the latent space, as in VAR)")
        vq.pop("codebook_dim", None)
        vq.pop("l2_normalize", None)
        self.dim, self.codebook_size, self.scales = dim, codebook_size, scales
        self.refine_ratio, self.upsample, self.beta, self.gradient = refine_ratio, upsample, beta, gradient
        # the VectorQuantizer's own beta is unused: this module computes VAR's loss itself
        self.vq = VectorQuantizer(dim=dim, codebook_size=codebook_size, **vq)
        self.refiners = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(num_refiners))
        self.refiner_of_scale = refiner_of_scale(len(scales), num_refiners)
        self.prefix_lengths = [sum(s * s for s in scales[: i + 1]) for i in range(len(scales))]

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size]

    @property
    def sequence_length(self) -> int:
        """Tokens per image, ``sum(s_k^2)``."""
        return self.prefix_lengths[-1]

    def index_shape_for(self, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        self._check_latent_size(tuple(latent_hw))
        return (self.sequence_length, 1)

    def _check_latent_size(self, latent_hw: tuple[int, ...]) -> None:
        side = self.scales[-1]
        if tuple(latent_hw) != (side, side):
            # Raised after construction (Tokenizer.token_shape, forward), where no builder prefixes the
            # key; the multi-scale quantizer is always a tokenizer config's top-level `quantizer`.
            raise ConfigValueError("quantizer.scales", self.scales, f"a schedule whose last size equals the latent "
                                   f"size {'x'.join(map(str, latent_hw))} (data.image_size / the encoder's "
                                   "downsampling factor; square latents): change data.image_size or quantizer.scales")

    # ---- the two halves of one scale, shared by forward and indices_to_latents (bitwise equal) --------

    def _downsample(self, residual: torch.Tensor, side: int) -> torch.Tensor:
        """Residual ``[B, C, h, w]`` -> ``[B, C, side, side]`` by area averaging (VAR)."""
        return residual if side == residual.shape[-1] else F.interpolate(residual, size=(side, side), mode="area")

    def _refined_code_map(self, token_map: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
        """Token map ``[B, s, s]`` of scale ``k`` -> its contribution to ``f_hat`` ``[B, C, *size]`` (float32,
        float64 for a ``.double()`` model): code lookup, upsampling to the latent size, refinement
        ``phi_k``. Differentiable in the codebook and the refiners."""
        codebook = self.vq.codebook
        codes = F.embedding(token_map, codebook.to(U.math_dtype(codebook)))  # [B, s, s, C]
        x = codes.permute(0, 3, 1, 2).contiguous()
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode=self.upsample, align_corners=False)
        j = self.refiner_of_scale[k]
        if j is not None:
            x = (1 - self.refine_ratio) * x + self.refine_ratio * self.refiners[j](x)
        return x

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4:
            raise ConfigValueError("z", tuple(z.shape), "latents [B, C, h, w] (multi-scale quantization needs a 2D map)")
        self._check_latent_size(tuple(z.shape[-2:]))
        size = tuple(z.shape[-2:])
        with U.float32_math(z.device):
            f = z.to(U.math_dtype(z, self.vq.codebook))
            residual, f_hat = f.detach(), torch.zeros_like(f)
            loss, metrics, token_maps = f.new_zeros(()), {}, []
            for k, side in enumerate(self.scales):
                # the shared VectorQuantizer picks the codes and keeps its statistics (EMA, usage, restarts)
                out = self.vq(self._downsample(residual, side))
                token_map = out.indices[..., 0]  # [B, s, s]
                contribution = self._refined_code_map(token_map, k, size)
                f_hat = f_hat + contribution
                residual = residual - contribution.detach()
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
                token_maps.append(token_map)
                metrics[f"perplexity/scale{k}"] = out.metrics["perplexity"]
                metrics[f"batch_usage/scale{k}"] = out.metrics["batch_usage"]
                if "restarted_codes" in out.metrics:
                    metrics["restarted_codes"] = metrics.get("restarted_codes", 0) + out.metrics["restarted_codes"]
            loss = loss / len(self.scales)
            # the value is exactly f_hat, the gradient goes to f by the chosen estimator (channels on dim 1)
            z_q = G.with_gradient(f, f_hat, self.gradient, dim=1).contiguous()
        indices = self.indices_from_scale_maps(token_maps)
        metrics["commitment"] = F.mse_loss(f_hat.detach(), f.detach())
        metrics.update(U.count_statistics(indices.reshape(-1), self.codebook_size))  # over all scales' tokens
        if self.training:
            metrics["usage"] = self.vq.window_usage()
        return QuantizerOutput(z_q=z_q, indices=indices, loss=loss, metrics=metrics)

    # ---- token sequence <-> token maps <-> latents ---------------------------------------------------

    def scale_maps(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Sequence ``[B, L, 1]`` (all scales, or a prefix of whole scales) -> token maps ``[B, s_k, s_k]``."""
        m = self._num_scales(indices)
        sides = self.scales[:m]
        parts = torch.split(indices[..., 0], [s * s for s in sides], dim=1)
        return [p.reshape(indices.shape[0], s, s) for p, s in zip(parts, sides)]

    def indices_from_scale_maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token maps ``[B, s_k, s_k]`` of the first ``m`` scales -> sequence ``[B, sum_k<m s_k^2, 1]``."""
        shapes = [tuple(t.shape[1:]) for t in maps]
        check(1 <= len(maps) <= len(self.scales) and shapes == [(s, s) for s in self.scales[: len(maps)]],
              "maps", shapes, f"token maps of the first scales of {self.scales}, each [B, s, s]")
        return torch.cat([t.reshape(t.shape[0], -1) for t in maps], dim=1).unsqueeze(-1)

    def _num_scales(self, indices: torch.Tensor) -> int:
        """How many whole scales the sequence ``[B, L, 1]`` holds; a clear error otherwise."""
        if indices.ndim != 3 or indices.shape[-1] != 1 or indices.shape[1] not in self.prefix_lengths:
            raise ConfigValueError("indices", tuple(indices.shape),
                                   f"shape [B, L, 1] with L in {self.prefix_lengths} (the first m scales of {self.scales})")
        return self.prefix_lengths.index(indices.shape[1]) + 1

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Sequence ``[B, L, 1]`` -> ``f_hat`` ``[B, C, h, w]`` (``[B, h, w, C]`` when ``channels_last``),
        ``h = w = scales[-1]``. With all ``sum(s_k^2)`` tokens this equals ``z_q`` of an eval-mode forward
        exactly; a prefix of the first ``m`` scales gives the coarser latent after ``m`` scales."""
        maps = self.scale_maps(indices)
        U.check_index_range(indices, self.codebook_size)
        side = self.scales[-1]
        with U.float32_math(indices.device):
            f_hat = torch.zeros(indices.shape[0], self.dim, side, side, device=indices.device,
                                dtype=U.math_dtype(self.vq.codebook))
            for k, token_map in enumerate(maps):
                f_hat = f_hat + self._refined_code_map(token_map, k, (side, side))
        f_hat = f_hat.contiguous()
        return f_hat.permute(0, 2, 3, 1) if channels_last else f_hat
