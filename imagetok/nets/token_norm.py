"""Per-(token, channel) standardisation of a 1D encoder's output, before the quantizer.

Why: a latent-query readout starts with near-uniform attention, so each latent token's output is its
learned query plus an average of the grid. Across images only 9% of that output's energy varies
(``benchmarks/oned_diagnosis.py``, ``cpu_hybrid`` at initialisation). The quantizer then gives nearly every
image the same code, the decoder learns the mean image within 20 steps, and the gradient that would
teach the encoder to differ vanishes: 8 of 11 ``cpu_hybrid`` runs collapsed that way (README, 1D
section). Removing the constant part and scaling the varying part to unit variance, per token and
channel, hands the quantizer and the decoder the image-dependent part from step 0. Measured
(``cpu_hybrid``, 500 steps): 0 of 3 seeds collapse with it, 2 of 3 without; the PSNR-against-k curve
stays flat all the same, so it fixes the collapse, not the redundancy of the tokens.

It is batch normalisation without affine parameters (Ioffe & Szegedy 2015,
https://arxiv.org/abs/1502.03167) over the batch axis only, one statistic per ``(token, channel)``: a
token's statistics never mix with another token's, so causal tokens stay causal and a prefix keeps
its meaning. Under data parallelism the batch statistics are averaged over ranks (with gradients, as
``SyncBatchNorm``), so every rank normalises alike and the running buffers stay bitwise equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from imagetok.errors import check

OUTPUT_NORMS = ("none", "batch")


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over data-parallel ranks (autograd flows through), or ``x`` in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x, op=dist.ReduceOp.SUM) / dist.get_world_size()
    return x


class TokenStandardize(nn.Module):
    """``[B, N, C]`` -> ``[B, N, C]``, each ``(token, channel)`` at zero mean and unit variance over the batch
    (training: this batch, all ranks; eval: the running estimates). No learned parameters.

    Args:
        num_tokens / channels: ``N`` and ``C``.
        momentum: weight of the new batch in the running mean and variance.
        eps: added to the variance.
    """

    def __init__(self, num_tokens: int, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_tokens, channels))
        self.register_buffer("running_var", torch.ones(num_tokens, channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[1]  # a prefix of the tokens uses the first n statistics
        if self.training and torch.is_grad_enabled():
            # two passes, not E[z^2] - E[z]^2: the constant part is large and float32 would cancel
            mean = _global_mean(z.float().mean(0))  # [n, C]
            var = _global_mean((z.float() - mean).pow(2).mean(0))
            with torch.no_grad():
                self.running_mean[:n].lerp_(mean.detach(), self.momentum)
                self.running_var[:n].lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean[:n], self.running_var[:n]
        return ((z.float() - mean) * torch.rsqrt(var + self.eps)).to(z.dtype)


def make_output_norm(kind: str, num_tokens: int, channels: int) -> nn.Module:
    """``kind``: ``none`` (identity) or ``batch`` (:class:`TokenStandardize`)."""
    check(kind in OUTPUT_NORMS, "output_norm", kind, f"one of {list(OUTPUT_NORMS)}")
    return TokenStandardize(num_tokens, channels) if kind == "batch" else nn.Identity()
