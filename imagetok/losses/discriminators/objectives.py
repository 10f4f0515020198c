"""The two GAN objectives tokenizers use: hinge (Lim & Ye 2017, "Geometric GAN") and non-saturating
(Goodfellow et al. 2014, "Generative Adversarial Nets"). Logits are any shape; the loss is their mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Scalar discriminator loss for ``"hinge"`` or ``"non_saturating"``."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """Scalar generator loss: ``-D(x_hat)`` (hinge) or ``softplus(-D(x_hat))`` (non-saturating)."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()
