"""Lookup-free quantization (LFQ, MAGVIT-v2, Yu et al. 2023, https://arxiv.org/abs/2310.05737).

Each of ``d`` latent channels is quantized independently to its sign: ``q_i = +s`` if ``x_i > 0`` else
``-s`` (``s = codebook_scale``), so the implicit codebook is ``{-s, s}^d`` with ``2^d`` codes and no
lookup; the code index is the number whose bits are ``[x_i > 0]``. Gradients pass straight through.
Code utilisation comes from MAGVIT-v2's entropy loss: the mean per-sample entropy of the soft
assignment ``p(c|x) = softmax_c(-||x - c||^2 * inv_temperature)`` minus the entropy of its batch mean
(``codebook_entropy_weight`` = the paper's diversity ``gamma``). With codes in ``{-s, s}^d`` this
softmax factorises into independent bits with logits ``4 s x_i * inv_temperature``; the codebook
entropy is estimated per group of bits as in Open-MAGVIT2's factorised tokens (``_binary.py``: the sum
over groups is an upper bound of the joint entropy, exact when one group covers all bits).

Indices are ``G = bits / bits_per_token`` sub-tokens of ``bits_per_token`` bits each (Open-MAGVIT2's
"token factorisation"; a 128-bit code as 8 sub-tokens of 16 bits fits ``uint16`` vocabularies).
"""

from __future__ import annotations

import torch

from imagetok.errors import check
from imagetok.quantizers._binary import BinaryQuantizer


class LookupFreeQuantizer(BinaryQuantizer):
    """Sign quantization of ``bits`` channels with MAGVIT-v2's entropy loss; ``indices[..., G]``.

    Args (besides :class:`~imagetok.quantizers._binary.BinaryQuantizer`'s):
        codebook_scale: magnitude ``s`` of the quantized values (``z_q`` channels are ``+-s``).

    Defaults are those of MAGVIT-v2 / Open-MAGVIT2: entropy weight 0.1, diversity ``gamma`` 1,
    commitment 0.25, inverse temperature 100 (temperature 0.01).
    """

    def __init__(self, *, dim: int, bits: int | None = None, bits_per_token: int | None = None,
                 entropy_group_bits: int | None = None, entropy_weight: float = 0.1,
                 codebook_entropy_weight: float = 1.0, commitment_weight: float = 0.25,
                 inv_temperature: float = 100.0, codebook_scale: float = 1.0, bit_decay: float = 0.99) -> None:
        super().__init__(dim=dim, bits=dim if bits is None else bits, bits_per_token=bits_per_token,
                         entropy_group_bits=entropy_group_bits, entropy_weight=entropy_weight,
                         codebook_entropy_weight=codebook_entropy_weight, commitment_weight=commitment_weight,
                         inv_temperature=inv_temperature, bit_decay=bit_decay)
        check(codebook_scale > 0, "codebook_scale", codebook_scale, "a positive float")
        self.codebook_scale = float(codebook_scale)

    def _codes(self, bits: torch.Tensor) -> torch.Tensor:
        s = self.codebook_scale
        return torch.where(bits, s, -s).float()

    def _binarize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        bits = x > 0  # a channel exactly 0 maps to -s (bit 0)
        q = self._codes(bits)
        q_st = q + (x - x.detach())  # value exactly q, gradient of x
        # -||x - c||^2 differs between c_i = +s and c_i = -s by 4 s x_i (other terms cancel)
        logits = 4 * self.codebook_scale * self.inv_temperature * x
        return bits, q_st, x, logits
