"""Discriminator on frozen DINOv2 features with small trainable heads.

The design of StyleGAN-T (Sauer et al. 2023, "StyleGAN-T: Unlocking the Power of GANs for Fast
Large-Scale Text-to-Image Synthesis"), which builds on Projected GANs (Sauer et al. 2021): a frozen
self-supervised ViT (DINO) is read at several depths, and each read-out gets its own light
discriminator head with spectral normalisation (Miyato et al. 2018, "Spectral Normalization for
Generative Adversarial Networks"). GigaTok (Xiong et al. 2025, "GigaTok: Scaling Visual Tokenizers to
3 Billion Parameters for Autoregressive Image Generation") uses it in place of PatchGAN for tokenizer
training, with DiffAug in front (``loss.diffaug``), and reports a better rFID at the same tokenizer.

Only the heads are parameters of this module (they train, go into checkpoints and DDP). The backbone
(:class:`imagetok.nets.foundation.FrozenBackbone`) is kept outside the module tree: it never enters a
checkpoint, an optimizer, the EMA or DDP, and is rebuilt from the same weights file (or seed) on resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from imagetok.errors import check
from imagetok.nets.foundation import FrozenBackbone


class _Head(nn.Module):
    """Token-grid features ``[B, C, h, w]`` -> logits ``[B, 1, h, w]``: a 1x1 projection, one residual
    3x3 block (the token grid's spatial context) and a 1x1 read-out, all spectrally normalised.
    GroupNorm rather than BatchNorm: no running statistics to drift apart across ranks."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = spectral_norm(nn.Conv2d(in_channels, channels, 1))
        self.conv = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1))
        self.norm = nn.GroupNorm(min(32, channels) if channels % min(32, channels) == 0 else 1, channels)
        self.out = spectral_norm(nn.Conv2d(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.proj(x), 0.2)
        h = h + F.leaky_relu(self.norm(self.conv(h)), 0.2)
        return self.out(h)


class DINODiscriminator(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] -> logits ``[B, n_blocks * g * g]`` (every head's per-token
    logits side by side; ``g`` = the backbone's token grid).

    Args:
        backbone: the frozen feature extractor; its ``blocks`` are the depths the heads read
            (StyleGAN-T / GigaTok read 4 evenly spaced blocks of a 12-block ViT-S: ``[2, 5, 8, 11]``).
        head_channels: width of each head.
    """

    def __init__(self, *, backbone: FrozenBackbone, head_channels: int = 128) -> None:
        super().__init__()
        check(isinstance(head_channels, int) and head_channels >= 1, "head_channels", head_channels, "an integer >= 1")
        check(isinstance(backbone, FrozenBackbone), "backbone", type(backbone).__name__,
              "an imagetok.nets.foundation.FrozenBackbone")
        backbone.requires_grad_(False).eval()
        self._backbone = [backbone]  # outside the module tree (see the module docstring)
        self.heads = nn.ModuleList(_Head(backbone.out_dim, head_channels) for _ in backbone.blocks)

    @property
    def backbone(self) -> FrozenBackbone:
        return self._backbone[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        if backbone.mean.device != images.device:
            backbone.to(images.device)
        # Runs under the trainer's autocast; gradients reach `images` (the generator loss), never the backbone.
        features = backbone(images)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features)], dim=1)
