"""Binary spherical quantization (BSQ, Zhao et al. 2024, "Image and Video Tokenization with Binary
Spherical Quantization", https://arxiv.org/abs/2406.07548).

Latents are projected to ``d = bits`` dimensions and l2-normalised onto the unit sphere,
``u = v / ||v||``; each coordinate is binarised, ``q = sign(u) / sqrt(d)``, so every code also lies on
the unit sphere (the implicit codebook is the ``2^d`` corners of a hypercube inscribed in it) and the
quantization error ``||u - q||`` is bounded whatever ``d``. Gradients pass straight through from ``q``
to ``u``. The index is the number whose bits are ``[u_i > 0]``.

Entropy loss (paper, Sec. 3.3): the soft assignment ``p(c|u) = softmax_c(inv_temperature * 2 c.u)``
factorises over dimensions, so the per-sample entropy is computed in closed form from per-bit
probabilities ``sigmoid(4 u_i * inv_temperature / sqrt(d))``; the codebook entropy is approximated by
groups of bits (``entropy_group_bits = 1`` is the paper's fully factorised approximation, larger
groups are the released code's grouped estimate; the sum over groups upper-bounds the joint entropy,
see ``_binary.py``). Loss = ``commitment_weight * mean((u - sg(q))^2)`` +
``entropy_weight * (H_sample - gamma * H_codebook)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imagetok.quantizers._binary import BinaryQuantizer


class BinarySphericalQuantizer(BinaryQuantizer):
    """Unit-sphere projection + sign with BSQ's factorised entropy loss; ``indices[..., G]``.

    ``z_q`` channels are ``+-1/sqrt(bits)`` (projected back to ``dim`` when ``dim != bits``). Defaults
    follow the released BSQ-ViT configuration: no commitment loss (``beta = 0``), entropy weight 0.1,
    ``gamma = 1``, inverse temperature 1. Arguments: see
    :class:`~imagetok.quantizers._binary.BinaryQuantizer`.
    """

    def __init__(self, *, dim: int, bits: int | None = None, bits_per_token: int | None = None,
                 entropy_group_bits: int | None = None, entropy_weight: float = 0.1,
                 codebook_entropy_weight: float = 1.0, commitment_weight: float = 0.0,
                 inv_temperature: float = 1.0, bit_decay: float = 0.99) -> None:
        super().__init__(dim=dim, bits=dim if bits is None else bits, bits_per_token=bits_per_token,
                         entropy_group_bits=entropy_group_bits, entropy_weight=entropy_weight,
                         codebook_entropy_weight=codebook_entropy_weight, commitment_weight=commitment_weight,
                         inv_temperature=inv_temperature, bit_decay=bit_decay)
        self.scale = 1.0 / math.sqrt(self.bits)

    def _codes(self, bits: torch.Tensor) -> torch.Tensor:
        return torch.where(bits, self.scale, -self.scale).float()

    def _binarize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        u = F.normalize(x, dim=-1)  # [T, d] on the unit sphere
        bits = u > 0  # a coordinate exactly 0 maps to -1/sqrt(d) (bit 0)
        q = self._codes(bits)
        q_st = q + (u - u.detach())  # value exactly q, gradient of u
        # 2 c.u differs between c_i = +1/sqrt(d) and c_i = -1/sqrt(d) by 4 u_i / sqrt(d)
        logits = 4 * self.scale * self.inv_temperature * u
        return bits, q_st, u, logits
