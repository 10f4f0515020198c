"""Dimension-wise post-training quantization of a KL-regularised latent (TokenBridge, Wang et al. 2025,
https://arxiv.org/abs/2503.16430).

Training sees no codebook: the quantizer is a KL bottleneck (a diagonal Gaussian posterior per
position, sampled with the reparameterisation trick). After training, ``python -m imagetok.fit_quantizer``
fits ``num_bins`` intervals per channel to the posterior means of real images and freezes them in
buffers (:meth:`DimensionWiseQuantizer.set_bins`); from then on every channel of the mean is one token,
``indices[..., C]``, and ``indices_to_latents`` returns each bin's reconstruction value.

Until it is fitted, ``forward`` still returns well-formed indices from *provisional* bins: the
equal-probability bins of a standard normal (what the KL term pulls each channel towards), so training
and validation can count codebook usage. The fit replaces them; decoding provisional indices is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from imagetok.errors import check
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput

FIT_COMMAND = "python -m imagetok.fit_quantizer checkpoint=<run>/checkpoints/last.ckpt out=<dir>"


def gaussian_bins(mean: torch.Tensor, std: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-probability bins of ``N(mean[c], std[c]^2)`` per channel.

    mean, std ``[C]`` -> interior edges ``[C, K - 1]`` (the ``k / K`` quantiles, k = 1..K-1) and
    reconstruction values ``[C, K]``: the mean of the Gaussian restricted to each bin (the outer bins
    reach to infinity, so their values stay finite without clipping). Computed in float64, returned
    as float32."""
    k = torch.arange(1, num_bins, dtype=torch.float64)
    edges01 = torch.special.ndtri(k / num_bins)  # standard-normal quantiles [K - 1]
    bounds = torch.cat([edges01.new_tensor([-math.inf]), edges01, edges01.new_tensor([math.inf])])
    density = torch.exp(-0.5 * bounds.pow(2)) / math.sqrt(2 * math.pi)  # 0 at +-inf
    values01 = (density[:-1] - density[1:]) * num_bins  # E[Z | bin] = (phi(a) - phi(b)) / (1 / K)
    mean, std = mean.double()[:, None], std.double()[:, None]
    return (mean + std * edges01).float(), (mean + std * values01).float()


def empirical_bins(samples: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins holding equal shares of ``samples`` ``[N, C]`` per channel.

    Edges ``[C, K - 1]`` are ``torch.quantile`` at ``k / K`` (linear interpolation); each value
    ``[C, K]`` is the mean of the samples falling in its bin, or the bin's centre (an outer bin's edge)
    when no sample does. ``N`` must stay within ``torch.quantile``'s input limit (subsample first)."""
    x = samples.double().t()  # [C, N]
    q = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
    edges = torch.quantile(x, q, dim=1).t().contiguous()  # [C, K - 1]
    idx = torch.searchsorted(edges, x.contiguous())  # [C, N] in [0, K)
    sums = torch.zeros(x.shape[0], num_bins, dtype=torch.float64).scatter_add_(1, idx, x)
    counts = torch.zeros_like(sums).scatter_add_(1, idx, torch.ones_like(x))
    lower = torch.cat([edges[:, :1], edges], dim=1)
    upper = torch.cat([edges, edges[:, -1:]], dim=1)
    values = torch.where(counts > 0, sums / counts.clamp_min(1), (lower + upper) / 2)
    return edges.float(), values.float()


class DimensionWiseQuantizer(Quantizer):
    """KL bottleneck in training, one token per channel after :meth:`set_bins`; ``indices[..., C]``.

    Args:
        dim: channels of the incoming latents, ``2 * C``: the posterior mean (first half) and
            log-variance (second half). ``out_dim = C`` channels reach the decoder.
        num_bins: values per channel after fitting (``codebook_sizes = [num_bins] * C``), >= 2.
        kl_weight: weight of ``KL(N(mean, var) || N(0, 1))``, summed over channels and averaged over
            positions (so it does not depend on the image size).
        logvar_range: clamp of the predicted log-variance, as in LDM's ``DiagonalGaussianDistribution``.

    Forward, before fitting: ``z_q`` is a posterior sample in training mode and the mean in eval mode.
    After fitting: ``z_q`` is each channel's bin value, with a straight-through gradient to the mean.
    ``loss`` is the weighted KL in both cases (it keeps the latent regular if training continues).
    """

    def __init__(self, *, dim: int, num_bins: int = 64, kl_weight: float = 1e-4,
                 logvar_range: tuple[float, float] = (-30.0, 20.0)) -> None:
        super().__init__()
        check(isinstance(dim, int) and dim >= 2 and dim % 2 == 0, "dim", dim,
              "an even integer >= 2 (mean and log-variance channels: 2 * C)")
        check(isinstance(num_bins, int) and num_bins >= 2, "num_bins", num_bins, "an integer >= 2, e.g. 64")
        check(kl_weight >= 0, "kl_weight", kl_weight, "a float >= 0")
        check(len(logvar_range) == 2 and logvar_range[0] < logvar_range[1], "logvar_range", list(logvar_range),
              "[low, high] with low < high")
        self.dim, self.num_bins, self.kl_weight = dim, num_bins, float(kl_weight)
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))
        channels = dim // 2
        edges, values = gaussian_bins(torch.zeros(channels), torch.ones(channels), num_bins)  # provisional
        # Saved with the weights: a fitted tokenizer carries its bins in model.safetensors.
        self.register_buffer("edges", edges)  # [C, K - 1], increasing per channel
        self.register_buffer("values", values)  # [C, K]
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def out_dim(self) -> int:
        return self.dim // 2

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.num_bins] * self.out_dim

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def check_fitted(self) -> None:
        """Raise a clear error unless the bins have been fitted (provisional tokens do not decode)."""
        if not self.is_fitted:
            raise RuntimeError("this DimensionWiseQuantizer has no fitted bins yet: its tokens are provisional "
                               f"(standard-normal bins). Fit them to the trained latents first: {FIT_COMMAND}")

    @torch.no_grad()
    def set_bins(self, edges: torch.Tensor, values: torch.Tensor) -> None:
        """Freeze fitted bins: ``edges`` ``[C, K - 1]`` (non-decreasing per channel) and ``values``
        ``[C, K]``. The only place the bins change after construction."""
        c, k = self.out_dim, self.num_bins
        check(tuple(edges.shape) == (c, k - 1), "edges", tuple(edges.shape), f"shape ({c}, {k - 1})")
        check(tuple(values.shape) == (c, k), "values", tuple(values.shape), f"shape ({c}, {k})")
        check(bool(torch.isfinite(edges).all() and torch.isfinite(values).all()), "edges/values", "non-finite",
              "finite numbers")
        check(bool((edges[:, 1:] >= edges[:, :-1]).all()), "edges", "not sorted", "non-decreasing per channel")
        self.edges.copy_(edges)
        self.values.copy_(values)
        self.fitted.fill_(True)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``z`` ``[B, 2C, *spatial]`` or ``[B, N, 2C]`` -> float32 posterior mean and clamped log-variance
        ``[T, C]`` each, and the function restoring ``[T, C]`` to the input layout."""
        tokens, restore = U.to_tokens(z)
        mean, logvar = tokens.float().chunk(2, dim=-1)
        return mean, logvar.clamp(*self.logvar_range), restore

    def bucketize(self, mean: torch.Tensor) -> torch.Tensor:
        """Float32 ``[T, C]`` -> bin index per channel ``[T, C]`` in ``[0, num_bins)``: bin ``i`` holds
        ``edges[i - 1] < x <= edges[i]``; values beyond the outer edges fall in the end bins."""
        return torch.searchsorted(self.edges, mean.t().contiguous()).t()

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Bin indices ``[T, C]`` -> reconstruction values ``[T, C]`` (float32)."""
        return self.values[torch.arange(self.out_dim, device=idx.device), idx]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with U.float32_math(z.device):
            mean, logvar, restore = self.split(z)
            # KL(N(mean, exp(logvar)) || N(0, 1)) per position, summed over channels
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
            idx = self.bucketize(mean.detach())
            continuous = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
            quantized = self.lookup(idx) + (mean - mean.detach())  # value exactly the bin's, gradient to the mean
            out = torch.where(self.fitted, quantized, continuous)  # a select, not a host sync on `fitted`
        metrics = {"kl": kl.detach(), "posterior_std": torch.exp(0.5 * logvar).mean().detach(),
                   "latent_std": mean.detach().std(0).mean() if mean.shape[0] > 1 else mean.new_zeros(())}
        for c in range(self.out_dim):  # each channel is its own sub-codebook of num_bins values
            for name, value in U.count_statistics(idx[:, c], self.num_bins).items():
                metrics[f"{name}/ch{c}"] = value
        return QuantizerOutput(z_q=restore(out), indices=idx.reshape(*U.index_shape(z), self.out_dim),
                               loss=self.kl_weight * kl, metrics=metrics)

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            self.check_fitted()
        check(indices.shape[-1] == self.out_dim, "indices", tuple(indices.shape), f"shape [B, *spatial, {self.out_dim}]")
        U.check_index_range(indices, self.num_bins)
        with U.float32_math(indices.device):
            out = self.lookup(indices.reshape(-1, self.out_dim)).reshape(indices.shape)
        return out if channels_last else out.movedim(-1, 1)
