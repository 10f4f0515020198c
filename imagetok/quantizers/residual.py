"""Residual vector quantization (RQ-VAE, Lee et al. 2022, https://arxiv.org/abs/2203.01941; as in
SoundStream and ResGen): level ``l`` quantizes what levels ``0..l-1`` left unexplained, and the
quantized latent is the sum of the chosen codes. With quantizer dropout (train on a random number of
levels), every prefix of the levels decodes, coarse to fine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imagetok.errors import ConfigValueError, check
from imagetok.quantizers import _gradients as G
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.simvq import SimVectorQuantizer
from imagetok.quantizers.vq import VectorQuantizer

LEVEL_QUANTIZERS = {"vq": VectorQuantizer, "simvq": SimVectorQuantizer}


class ResidualVectorQuantizer(Quantizer):
    """``depth`` levels of :class:`VectorQuantizer` on successive residuals; ``indices[..., depth]``.

    Args:
        dim: channels of the incoming latents.
        codebook_size: codes per level.
        depth: number of levels (sub-tokens per position).
        shared_codebook: one codebook for all levels (RQ-VAE) instead of one per level.
        quantizer_dropout: probability that a training step uses only the first ``n`` levels, ``n``
            uniform in ``1..depth``; the draw is made on rank 0 and broadcast, so ranks agree.
        gradient: estimator from the sum of the chosen codes back to ``z``, ``"ste"`` or ``"rotation"``
            (one rotation of ``z`` onto the quantized sum per position; ``_gradients.py``).
        level_quantizer: what each level is, ``"vq"`` (:class:`VectorQuantizer`) or ``"simvq"``
            (:class:`~imagetok.quantizers.simvq.SimVectorQuantizer`: frozen codes through a learned map).
        **vq: every other :class:`VectorQuantizer` option (``beta``, ``codebook_update``, ``decay``,
            ``kmeans_init_batches``, ``dead_code_threshold``, ``l2_normalize``, ...), for each level.
    """

    def __init__(self, *, dim: int, codebook_size: int, depth: int = 4, shared_codebook: bool = False,
                 quantizer_dropout: float = 0.0, gradient: str = "ste", level_quantizer: str = "vq",
                 **vq: Any) -> None:
        super().__init__()
        G.check_gradient(gradient)
        check(level_quantizer in LEVEL_QUANTIZERS, "level_quantizer", level_quantizer,
              "'vq' (learned codebook) or 'simvq' (frozen codebook through a learned linear map)")
        check(isinstance(depth, int) and depth >= 1, "depth", depth, "an integer >= 1")
        check(0.0 <= quantizer_dropout <= 1.0, "quantizer_dropout", quantizer_dropout, "a float in [0, 1]")
        check(not vq.get("l2_normalize", False), "l2_normalize", True,
              "false: residuals shrink level by level, unit-norm codes cannot follow them")
        self.dim, self.depth, self.codebook_size = dim, depth, codebook_size
        self.shared_codebook, self.quantizer_dropout = shared_codebook, quantizer_dropout
        self.gradient, self.level_quantizer = gradient, level_quantizer
        count = 1 if shared_codebook else depth
        level = LEVEL_QUANTIZERS[level_quantizer]
        self.levels = nn.ModuleList(level(dim=dim, codebook_size=codebook_size, **vq) for _ in range(count))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size] * self.depth

    def level(self, i: int) -> VectorQuantizer:
        return self.levels[0 if self.shared_codebook else i]

    def _levels_used(self, training: bool) -> int:
        """How many levels contribute to ``z_q`` in this forward (all of them outside training)."""
        if not training or self.quantizer_dropout == 0:
            return self.depth
        draw = torch.rand(2)  # [apply dropout?, which depth]
        draw = U.broadcast_from_rank0(draw.to(self.level(0).codebook.device)).cpu()
        if draw[0] >= self.quantizer_dropout:
            return self.depth
        return 1 + min(int(draw[1] * self.depth), self.depth - 1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        updating = self.training and torch.is_grad_enabled()
        used = self._levels_used(updating)
        residual, quantized = z.float(), torch.zeros_like(z, dtype=torch.float32)
        loss, metrics, indices = z.new_zeros(()).float(), {}, []
        for i in range(self.depth):
            if i < used:
                out = self.level(i)(residual)
                loss = loss + out.loss
            else:  # dropped levels: indices only, no loss, no state change
                with torch.no_grad():
                    out = self.level(i)(residual)
            value = out.z_q.detach()  # the code itself (z_q carries a straight-through term)
            if i < used:
                quantized = quantized + value
            residual = residual - value
            indices.append(out.indices)
            for key in ("perplexity", "batch_usage", "usage"):
                if key in out.metrics:
                    metrics[f"{key}/level{i}"] = out.metrics[key]
        metrics["levels_used"] = torch.tensor(float(used))
        # the value is the sum of the used codes, the gradient reaches the encoder by the chosen estimator;
        # contiguous in both paths: a conv over a differently strided input may round differently
        z_q = G.with_gradient(z.float(), quantized, self.gradient, dim=-1 if z.ndim == 3 else 1).contiguous()
        return QuantizerOutput(z_q=z_q, indices=torch.cat(indices, dim=-1), loss=loss, metrics=metrics)

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Sum of the codes of ``indices[..., :d]`` for any ``1 <= d <= depth`` (a prefix decodes)."""
        d = indices.shape[-1]
        if not 1 <= d <= self.depth:
            raise ConfigValueError("indices", tuple(indices.shape), f"shape [B, *spatial, d] with 1 <= d <= {self.depth}")
        total = None
        for i in range(d):
            latents = self.level(i).indices_to_latents(indices[..., i : i + 1], channels_last)
            total = latents if total is None else total + latents
        return total.contiguous()
