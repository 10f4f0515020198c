"""Discriminator regularisers: LeCAM and (lazy) R1.

* LeCAM (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data",
  https://arxiv.org/abs/2104.03310) keeps the discriminator's outputs near moving anchors, the EMAs of
  its mean output on real (``alpha_R``) and generated (``alpha_F``) images:
  ``R_LC = E[relu(D(x) - alpha_F)^2] + E[relu(alpha_R - D(G(z)))^2]`` (the relu as in the authors'
  code: only outputs that overshoot the other side's anchor are pulled back). The anchors are buffers:
  they go into checkpoints, resume exactly, and are updated from batch means averaged over all ranks,
  so every rank holds the same anchors.
* R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?",
  https://arxiv.org/abs/1801.04406): ``gamma / 2 * E[||grad_x D(x)||^2]`` on real images. Lazy
  regularisation (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"): applied
  every ``N``-th discriminator step only, multiplied by ``N`` so that its average strength is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.quantizers._utils import all_reduce_sum, world_size


class LeCAM(nn.Module):
    """LeCAM regulariser with EMA anchors in buffers ``anchor_real`` and ``anchor_fake`` (float32 scalars).

    Args:
        decay: EMA decay of the anchors (the authors use 0.99).
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        check(isinstance(decay, (int, float)) and 0 <= decay < 1, "lecam_decay", decay, "a float in [0, 1)")
        self.decay = float(decay)
        self.register_buffer("anchor_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("anchor_fake", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Move the anchors toward this step's mean outputs, averaged over every rank."""
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        means = all_reduce_sum(means) / world_size()
        anchors = torch.stack([self.anchor_real, self.anchor_fake])
        anchors.mul_(self.decay).add_(means, alpha=1 - self.decay)
        self.anchor_real.copy_(anchors[0])
        self.anchor_fake.copy_(anchors[1])

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Update the anchors, then the (unweighted) scalar penalty on this step's logits (any shape)."""
        if self.training:
            self.update(logits_real, logits_fake)
        return (F.relu(logits_real.float() - self.anchor_fake).pow(2).mean()
                + F.relu(self.anchor_real - logits_fake.float()).pow(2).mean())


def r1_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """``E_x[||grad_x sum D(x)||^2]``: the squared norm of the gradient of the summed logits (all patches or
    tokens of an image) w.r.t. the real images ``[B, 3, H, W]``, averaged over the batch. The graph is
    kept (``create_graph``) so that the penalty trains the discriminator. Attention runs in PyTorch's
    plain math kernel here: the fused ones (flash, memory-efficient) have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    real = real.detach().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def r1_due(disc_step: int, every: int) -> bool:
    """Lazy R1 runs on discriminator steps 0, N, 2N, ... (``disc_step`` counts from the first one)."""
    return disc_step >= 0 and disc_step % every == 0
