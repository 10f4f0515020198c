"""How many bits a tokenizer spends on an image: the rate side of its rate-distortion trade-off, so that
tokenizers with different grids, codebooks and sub-token counts compare at equal PSNR or rFID.

The rate is the tokens' raw capacity, not an entropy: every token position carries ``K`` sub-tokens,
sub-token ``k`` one of ``codebook_sizes[k]`` codes, so it can say ``log2(codebook_sizes[k])`` bits
(exactly, not rounded up to whole bits: an FSQ code of 1000 levels is 9.97 bits). Then

    bits per image = positions * sum_k log2(codebook_sizes[k])
    bits per pixel = bits per image / (H * W)

e.g. the default 8x8x1 grid of 1024 codes on a 32 px image: 64 * 10 / 1024 = 0.625 bpp; LFQ with two
sub-tokens of 512 codes on the same grid: 64 * (9 + 9) / 1024 = 1.125 bpp. The entropy of the tokens
actually used (``tokens``/``token_language`` in metrics.json) says how much of that capacity is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DEFINITION = ("bits_per_pixel = tokens_per_image * sum over sub-tokens k of log2(codebook_size_k) / image_size^2 "
              "(raw capacity of the token grid, log2 not rounded; tokens_per_image counts positions, each of "
              "sub_tokens_per_token sub-tokens)")


def bits_per_token(codebook_sizes: Sequence[int]) -> float:
    """Bits one token position can carry: ``sum_k log2(codebook_sizes[k])`` over its sub-tokens."""
    if not codebook_sizes or any(int(size) < 1 for size in codebook_sizes):
        raise ValueError(f"codebook sizes must be positive integers, got {list(codebook_sizes)}")
    return sum(math.log2(int(size)) for size in codebook_sizes)


def token_bitrate(token_shape: Sequence[int], codebook_sizes: Sequence[int], image_size: int) -> dict[str, Any]:
    """``tokens_per_image`` (positions: the product of ``token_shape[:-1]``), ``sub_tokens_per_token``
    (``token_shape[-1]``, one per codebook size) and ``bits_per_pixel`` of square ``image_size`` images.

    ``token_shape``: what ``encode`` returns for one image without the batch (``Tokenizer.token_shape``):
    ``(h, w, K)`` for a grid, ``(N, K)`` for a 1D sequence or the multi-scale one."""
    positions, sub_tokens = math.prod(token_shape[:-1]), token_shape[-1]
    if sub_tokens != len(codebook_sizes):
        raise ValueError(f"{sub_tokens} sub-tokens per position but {len(codebook_sizes)} codebook sizes")
    return {"tokens_per_image": positions, "sub_tokens_per_token": sub_tokens,
            "bits_per_pixel": positions * bits_per_token(codebook_sizes) / image_size**2}
