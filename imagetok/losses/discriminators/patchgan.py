"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", https://arxiv.org/abs/1611.07004), as used by VQGAN (Esser et al. 2021).

Its parameter names (``main.<i>.weight``) are those of earlier imagetok checkpoints
(``loss.discriminator.main.*``); keep them."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from imagetok.errors import check


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> real/fake logits per patch ``[B, 1, h, w]``.

    Args:
        ch: width of the first layer; doubles per layer up to ``8 * ch``.
        n_layers: stride-2 layers (receptive field 70px at 3).
        norm: ``"group"`` (default: no running statistics to drift apart across ranks), ``"batch"``
            (the original) or ``"none"``.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 64, n_layers: int = 3,
                 norm: Literal["group", "batch", "none"] = "group") -> None:
        super().__init__()
        check(norm in ("group", "batch", "none"), "norm", norm, "'group', 'batch' or 'none'")
        check(isinstance(n_layers, int) and n_layers >= 1, "n_layers", n_layers, "an integer >= 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = ch
        for n in range(1, n_layers + 1):
            out = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=norm == "none"), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN initialisation, as PatchGAN uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)
