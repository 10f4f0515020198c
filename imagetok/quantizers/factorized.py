"""Factorized vector quantization (FQGAN, Bao et al. 2024, https://arxiv.org/abs/2411.16681).

One large codebook is replaced by ``k`` small sub-codebooks, each fed by its own learned projection of
the latent; the decoder sees their quantized outputs concatenated. Two regularisers keep the
sub-codebooks from learning the same thing:

* a disentanglement loss, the squared cosine similarity between the l2-normalised quantized
  sub-latents of every pair of sub-codebooks at the same position (0 when they are orthogonal);
* optional representation alignment: a small head per chosen sub-codebook predicts a frozen teacher's
  features from the sub-code; the head's output is returned in ``QuantizerOutput.features``
  (``"semantic/<i>"``) and compared with the teacher by :class:`imagetok.losses.semantic.SemanticAlignmentLoss`.

Every sub-codebook is a :class:`VectorQuantizer`, so EMA updates, k-means initialisation, dead-code
restarts and their buffers (one ``_utils.all_reduce_sum`` per sub-codebook) come from there.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.vq import VectorQuantizer


def alignment_head(in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    """Per-token MLP ``[..., in_dim] -> [..., out_dim]`` mapping a (sub-)code to teacher features."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def squared_cosine_overlap(parts: list[torch.Tensor]) -> torch.Tensor:
    """Mean over positions and pairs of ``cos(a, b)^2`` between the ``[T, D]`` tensors in ``parts``
    (0 for a single part): 0 when the sub-latents are orthogonal, 1 when they are parallel."""
    if len(parts) < 2:
        return parts[0].new_zeros(())
    unit = [F.normalize(p, dim=-1) for p in parts]
    pairs = [(a * b).sum(-1).pow(2).mean() for a, b in itertools.combinations(unit, 2)]
    return torch.stack(pairs).mean()


class FactorizedVectorQuantizer(Quantizer):
    """``k`` sub-codebooks over ``k`` projections of the latent; ``indices[..., k]``, ``out_dim = k * sub_dim``.

    Args:
        dim: channels of the incoming latents.
        num_codebooks: number of sub-codebooks ``k``.
        codebook_size: codes per sub-codebook (one int for all, or a list of ``k``).
        sub_dim: dimension of each projection and of its codes.
        disentangle_weight: weight of the squared-cosine overlap between sub-codes (FQGAN uses 0.1).
        semantic_dim: channels of the teacher's features; when set, alignment heads are built and
            ``features["semantic/<i>"]`` ``[B, semantic_dim, *spatial]`` is returned (None = no heads).
        aligned_codebooks: which sub-codebooks get a head (None = all; FQGAN-Dual aligns one and leaves
            the other to pixel detail).
        head_hidden: hidden width of the alignment MLPs.
        l2_normalize, beta, codebook_update, decay, epsilon, kmeans_init_batches, kmeans_iters,
        dead_code_threshold, usage_window, max_search_elements, gradient: as in :class:`VectorQuantizer`, for every
            sub-codebook.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_codebooks: int = 2,
        codebook_size: int | list[int] = 1024,
        sub_dim: int = 8,
        disentangle_weight: float = 0.1,
        semantic_dim: int | None = None,
        aligned_codebooks: list[int] | None = None,
        head_hidden: int = 64,
        l2_normalize: bool = True,
        beta: float = 0.25,
        codebook_update: Literal["loss", "ema"] = "loss",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init_batches: int = 0,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        usage_window: int = 1000,
        max_search_elements: int = 2**20,
        gradient: str = "ste",
    ) -> None:
        super().__init__()
        check(isinstance(dim, int) and dim >= 1, "dim", dim, "a positive integer")
        check(isinstance(num_codebooks, int) and num_codebooks >= 1, "num_codebooks", num_codebooks,
              "a positive integer (FQGAN uses 2 or 3)")
        sizes = [codebook_size] * num_codebooks if isinstance(codebook_size, int) else list(codebook_size)
        check(len(sizes) == num_codebooks and all(isinstance(s, int) and s >= 1 for s in sizes), "codebook_size",
              codebook_size, f"a positive integer or a list of {num_codebooks} positive integers")
        check(isinstance(sub_dim, int) and sub_dim >= 1, "sub_dim", sub_dim, "a positive integer")
        check(disentangle_weight >= 0, "disentangle_weight", disentangle_weight, "a float >= 0")
        check(semantic_dim is None or (isinstance(semantic_dim, int) and semantic_dim >= 1), "semantic_dim",
              semantic_dim, "null (no alignment heads) or the teacher's feature channels")
        aligned = list(range(num_codebooks)) if aligned_codebooks is None else list(aligned_codebooks)
        check(all(isinstance(i, int) and 0 <= i < num_codebooks for i in aligned) and len(set(aligned)) == len(aligned),
              "aligned_codebooks", aligned_codebooks, f"null or distinct sub-codebook numbers in [0, {num_codebooks})")
        self.dim, self.num_codebooks, self.sub_dim = dim, num_codebooks, sub_dim
        self.disentangle_weight, self.semantic_dim = disentangle_weight, semantic_dim
        self.aligned_codebooks = aligned if semantic_dim is not None else []
        # Own projection per sub-codebook (FQGAN's factorized encoder heads); the codes live in sub_dim.
        self.projections = nn.ModuleList(nn.Linear(dim, sub_dim) for _ in range(num_codebooks))
        vq_kwargs = dict(l2_normalize=l2_normalize, beta=beta, codebook_update=codebook_update, decay=decay,
                         epsilon=epsilon, kmeans_init_batches=kmeans_init_batches, kmeans_iters=kmeans_iters,
                         dead_code_threshold=dead_code_threshold, usage_window=usage_window,
                         max_search_elements=max_search_elements, gradient=gradient)
        self.codebooks = nn.ModuleList(VectorQuantizer(dim=sub_dim, codebook_size=s, **vq_kwargs) for s in sizes)
        self.heads = nn.ModuleDict({str(i): alignment_head(sub_dim, semantic_dim, head_hidden)
                                    for i in self.aligned_codebooks}) if semantic_dim is not None else nn.ModuleDict()

    @property
    def out_dim(self) -> int:
        return self.num_codebooks * self.sub_dim

    @property
    def codebook_sizes(self) -> list[int]:
        return [vq.codebook_size for vq in self.codebooks]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)  # [T, dim]
        parts, indices, losses, metrics = [], [], [], {}
        with U.float32_math(z.device):  # projections too: a bf16 projection would change the indices
            for i, (proj, vq) in enumerate(zip(self.projections, self.codebooks)):
                out = vq(proj(tokens.float()).unsqueeze(0))  # [1, T, sub_dim] sequence layout
                parts.append(out.z_q[0])  # [T, sub_dim], straight-through
                indices.append(out.indices[0, :, 0])  # [T]
                losses.append(out.loss)
                metrics.update({f"{k}/sub{i}": v for k, v in out.metrics.items()})
            overlap = squared_cosine_overlap(parts)
        loss = torch.stack(losses).sum() + self.disentangle_weight * overlap
        metrics["disentangle"] = overlap.detach()
        features = {f"semantic/{i}": restore(self.heads[str(i)](parts[i])) for i in self.aligned_codebooks}
        idx = torch.stack(indices, dim=-1).reshape(*U.index_shape(z), self.num_codebooks)
        return QuantizerOutput(z_q=restore(torch.cat(parts, dim=-1)), indices=idx, loss=loss,
                               metrics=metrics, features=features)

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        check(indices.shape[-1] == self.num_codebooks, "indices", tuple(indices.shape),
              f"shape [B, *spatial, {self.num_codebooks}]")
        parts = [vq.indices_to_latents(indices[..., i : i + 1], channels_last=True)
                 for i, vq in enumerate(self.codebooks)]
        out = torch.cat(parts, dim=-1)  # [B, *S, k * sub_dim]
        return out if channels_last else out.movedim(-1, 1)

    def sub_latents(self, indices: torch.Tensor, codebook: int) -> torch.Tensor:
        """Codes of one sub-codebook: indices ``[B, *spatial, k]`` -> ``[B, sub_dim, *spatial]`` (e.g. the
        teacher-aligned sub-code as input of an understanding model)."""
        check(0 <= codebook < self.num_codebooks, "codebook", codebook, f"an integer in [0, {self.num_codebooks})")
        return self.codebooks[codebook].indices_to_latents(indices[..., codebook : codebook + 1])
