"""Dual-codebook quantization: a semantic and a pixel codebook over one latent.

* TokenFlow (Qu et al. 2024, https://arxiv.org/abs/2412.03069), ``mapping="shared"``: the two codebooks
  have the same size and are indexed together. Each position takes the ONE index minimising
  ``semantic_weight * d_semantic + d_pixel`` (TokenFlow writes ``d_sem + w_dis * d_pix``; the argmin is
  the same for ``semantic_weight = 1 / w_dis``), so a token retrieves both a semantic and a pixel
  embedding: ``indices[..., 1]``.
* DualToken (Song et al. 2025, https://arxiv.org/abs/2503.14324), ``mapping="separate"``: each branch
  picks its own code: ``indices[..., 2]``, ``[..., 0]`` semantic and ``[..., 1]`` pixel.

Both branches are learned projections of the same latent (the papers use two encoders, or shallow
and deep layers of one). The semantic branch's quantized code goes through a small head whose output,
``features["semantic"]`` ``[B, semantic_dim, *spatial]``, is distilled to a frozen teacher by
:class:`imagetok.losses.semantic.SemanticAlignmentLoss`. The decoder gets the pixel code, or both codes
concatenated (``decoder_input="both"``); :meth:`DualCodebookQuantizer.semantic_latents` gives the
semantic embeddings of tokens for understanding models.

Each codebook is a :class:`VectorQuantizer` (EMA, k-means, restarts and their buffers). With the shared
mapping the index is chosen jointly, so k-means initialisation and dead-code restarts are done jointly
here too (a code is revived in both codebooks from the same position), the EMA statistics by each
codebook from the shared index.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.quantizers import _gradients as G
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.factorized import alignment_head
from imagetok.quantizers.vq import VectorQuantizer


def shared_nearest_code(xs: torch.Tensor, cs: torch.Tensor, xp: torch.Tensor, cp: torch.Tensor, weight: float,
                        max_elements: int = 2**20) -> torch.Tensor:
    """Index minimising ``weight * ||xs - cs_k||^2 + ||xp - cp_k||^2`` for each row.

    ``xs`` ``[T, Ds]`` / ``cs`` ``[K, Ds]`` (semantic), ``xp`` ``[T, Dp]`` / ``cp`` ``[K, Dp]`` (pixel), float32
    -> LongTensor ``[T]``. Built a block of rows at a time, as ``_utils.nearest_code``."""
    rows = max(16, max_elements // max(1, cs.shape[0]))
    code_sq = weight * cs.pow(2).sum(1) + cp.pow(2).sum(1)  # [K]
    out = torch.empty(xs.shape[0], dtype=torch.long, device=xs.device)
    for start in range(0, xs.shape[0], rows):
        block = slice(start, start + rows)
        d = torch.addmm(code_sq, xs[block], cs.t(), alpha=-2.0 * weight)  # per-row constants dropped
        out[block] = torch.addmm(d, xp[block], cp.t(), alpha=-2.0).argmin(1)
    return out


class DualCodebookQuantizer(Quantizer):
    """Semantic + pixel codebooks, shared (TokenFlow) or separate (DualToken) indices.

    Args:
        dim: channels of the incoming latents.
        semantic_dim: channels of the teacher's features that the semantic head predicts.
        codebook_size: codes of the semantic codebook (and of the pixel one with ``mapping="shared"``).
        pixel_codebook_size: codes of the pixel codebook with ``mapping="separate"`` (None = codebook_size).
        semantic_code_dim, pixel_code_dim: dimensions of the two projections and their codes.
        mapping: ``"shared"`` (one index) or ``"separate"`` (two indices).
        semantic_weight: weight of the semantic distance in the shared index choice (> 0).
        decoder_input: ``"pixel"`` (``out_dim = pixel_code_dim``) or ``"both"`` (pixel and semantic codes
            concatenated, ``out_dim = pixel_code_dim + semantic_code_dim``).
        head_hidden: hidden width of the semantic head.
        l2_normalize, beta, codebook_update, decay, epsilon, kmeans_init_batches, kmeans_iters,
        dead_code_threshold, usage_window, max_search_elements, gradient: as in :class:`VectorQuantizer`, for both.
    """

    def __init__(
        self,
        *,
        dim: int,
        semantic_dim: int,
        codebook_size: int = 1024,
        pixel_codebook_size: int | None = None,
        semantic_code_dim: int = 8,
        pixel_code_dim: int = 8,
        mapping: Literal["shared", "separate"] = "shared",
        semantic_weight: float = 1.0,
        decoder_input: Literal["pixel", "both"] = "pixel",
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
        check(isinstance(semantic_dim, int) and semantic_dim >= 1, "semantic_dim", semantic_dim,
              "the teacher's feature channels (a positive integer)")
        check(mapping in ("shared", "separate"), "mapping", mapping, "'shared' (TokenFlow) or 'separate' (DualToken)")
        check(decoder_input in ("pixel", "both"), "decoder_input", decoder_input, "'pixel' or 'both'")
        check(semantic_weight > 0, "semantic_weight", semantic_weight, "a float > 0")
        pixel_size = codebook_size if pixel_codebook_size is None else pixel_codebook_size
        check(mapping == "separate" or pixel_size == codebook_size, "pixel_codebook_size", pixel_codebook_size,
              f"null or {codebook_size} (= codebook_size: the shared mapping indexes both codebooks with one token)")
        for key, value in (("semantic_code_dim", semantic_code_dim), ("pixel_code_dim", pixel_code_dim)):
            check(isinstance(value, int) and value >= 1, key, value, "a positive integer")
        self.dim, self.semantic_dim, self.mapping = dim, semantic_dim, mapping
        self.semantic_weight, self.decoder_input = float(semantic_weight), decoder_input
        self.semantic_code_dim, self.pixel_code_dim = semantic_code_dim, pixel_code_dim
        self.l2_normalize, self.beta, self.codebook_update = l2_normalize, beta, codebook_update
        self.max_search_elements = max_search_elements
        shared = mapping == "shared"
        # With the shared mapping, k-means and restarts must treat both codebooks at once (done here).
        self.kmeans_init_batches = kmeans_init_batches if shared else 0
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold if shared else 0.0
        vq_kwargs = dict(l2_normalize=l2_normalize, beta=beta, codebook_update=codebook_update, decay=decay,
                         epsilon=epsilon, kmeans_iters=kmeans_iters, usage_window=usage_window,
                         max_search_elements=max_search_elements, gradient=gradient,
                         kmeans_init_batches=0 if shared else kmeans_init_batches,
                         dead_code_threshold=0.0 if shared else dead_code_threshold)
        self.semantic_proj = nn.Linear(dim, semantic_code_dim)
        self.pixel_proj = nn.Linear(dim, pixel_code_dim)
        self.semantic_codebook = VectorQuantizer(dim=semantic_code_dim, codebook_size=codebook_size, **vq_kwargs)
        self.pixel_codebook = VectorQuantizer(dim=pixel_code_dim, codebook_size=pixel_size, **vq_kwargs)
        self.semantic_head = alignment_head(semantic_code_dim, semantic_dim, head_hidden)
        self._kmeans_pool: list[torch.Tensor] = []  # transient: only during the first batches

    @property
    def out_dim(self) -> int:
        return self.pixel_code_dim + (self.semantic_code_dim if self.decoder_input == "both" else 0)

    @property
    def codebook_sizes(self) -> list[int]:
        if self.mapping == "shared":
            return [self.semantic_codebook.codebook_size]
        return [self.semantic_codebook.codebook_size, self.pixel_codebook.codebook_size]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)  # [T, dim]
        with U.float32_math(z.device):  # projections too: a bf16 projection would change the indices
            xs, xp = self.semantic_proj(tokens.float()), self.pixel_proj(tokens.float())
            if self.mapping == "shared":
                sem, pix, idx, loss, metrics = self._shared(xs, xp)
            else:
                sem, pix, idx, loss, metrics = self._separate(xs, xp)
        z_q = pix if self.decoder_input == "pixel" else torch.cat([pix, sem], dim=-1)
        features = {"semantic": restore(self.semantic_head(sem))}
        indices = idx.reshape(*U.index_shape(z), idx.shape[-1])
        return QuantizerOutput(z_q=restore(z_q), indices=indices, loss=loss, metrics=metrics, features=features)

    def _separate(self, xs: torch.Tensor, xp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """DualToken: each codebook quantizes its branch on its own (all of VectorQuantizer's machinery)."""
        sem = self.semantic_codebook(xs.unsqueeze(0))  # [1, T, D] sequence layout
        pix = self.pixel_codebook(xp.unsqueeze(0))
        metrics = {f"{k}/sub0": v for k, v in sem.metrics.items()} | {f"{k}/sub1": v for k, v in pix.metrics.items()}
        idx = torch.cat([sem.indices[0], pix.indices[0]], dim=-1)  # [T, 2]
        return sem.z_q[0], pix.z_q[0], idx, sem.loss + pix.loss, metrics

    def _shared(self, xs: torch.Tensor, xp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """TokenFlow: one index from the weighted sum of both distances; both codebooks follow it."""
        books = (self.semantic_codebook, self.pixel_codebook)
        # The codebooks' own lookup space (same package): l2-normalised latents and codes when asked.
        xs, xp = books[0]._project_in(xs), books[1]._project_in(xp)
        updating = self.training and torch.is_grad_enabled()
        if updating and not U.is_initialized(books[0]):
            self._initialize(xs.detach(), xp.detach())
        cs, cp = books[0]._codes(), books[1]._codes()
        idx = shared_nearest_code(xs.detach(), cs.detach(), xp.detach(), cp.detach(), self.semantic_weight,
                                  self.max_search_elements)
        qs, qp = F.embedding(idx, cs), F.embedding(idx, cp)
        commit_s, commit_p = F.mse_loss(xs, qs.detach()), F.mse_loss(xp, qp.detach())
        loss = self.beta * (commit_s + commit_p)
        metrics = {"commitment/semantic": commit_s.detach(), "commitment/pixel": commit_p.detach()}
        if self.codebook_update == "loss":
            loss = loss + F.mse_loss(qs, xs.detach()) + F.mse_loss(qp, xp.detach())
        counts = U.code_counts(idx, books[0].codebook_size)
        if updating and U.is_initialized(books[0]):
            books[0]._update_state(xs.detach(), idx, counts)
            books[1]._update_state(xp.detach(), idx, counts)
            metrics["restarted_codes"] = torch.tensor(float(self._restart_dead_codes(xs.detach(), xp.detach())))
        metrics["perplexity"] = U.perplexity(counts)
        metrics["batch_usage"] = (counts > 0).float().mean()
        if self.training:
            metrics["usage"] = books[0].window_usage()
        # Values exactly the codes, gradients to the projections and the encoder by the codebooks' estimator.
        gradient = books[0].gradient
        sem, pix = G.with_gradient(xs, qs, gradient), G.with_gradient(xp, qp, gradient)
        return sem, pix, idx.unsqueeze(-1), loss, metrics

    @torch.no_grad()
    def _initialize(self, xs: torch.Tensor, xp: torch.Tensor) -> None:
        """Shared mapping: k-means over the concatenation ``[sqrt(w) xs, xp]``, whose squared distance
        is exactly the weighted sum used for the index, then split into the two codebooks; without
        k-means each codebook takes VectorQuantizer's uniform initial statistics."""
        books = (self.semantic_codebook, self.pixel_codebook)
        if self.kmeans_init_batches <= 0:
            for book, x in zip(books, (xs, xp)):
                book._initialize(x)
            return
        scale = math.sqrt(self.semantic_weight)
        self._kmeans_pool.append(torch.cat([xs * scale, xp], dim=1))
        if len(self._kmeans_pool) < self.kmeans_init_batches:
            return
        pool = torch.cat(self._kmeans_pool)
        self._kmeans_pool.clear()
        centroids, counts = U.kmeans(pool, books[0].codebook_size, self.kmeans_iters)
        centroids = U.broadcast_from_rank0(centroids)
        per_step = U.broadcast_from_rank0(counts * xs.shape[0] * U.world_size() / pool.shape[0])
        codes = (centroids[:, : self.semantic_code_dim] / scale, centroids[:, self.semantic_code_dim :])
        for book, c in zip(books, codes):
            c = F.normalize(c, dim=-1) if self.l2_normalize else c
            book.codebook.data.copy_(c)
            book.cluster_size.copy_(per_step)
            book.embed_sum.copy_(c * per_step[:, None])
            book.initialized.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, xs: torch.Tensor, xp: torch.Tensor) -> int:
        """Revive codes whose moving-average count fell below the threshold in BOTH codebooks from the
        same random positions of this batch (the two codebooks share counts, so they share dead codes)."""
        if self.dead_code_threshold <= 0:
            return 0
        books = (self.semantic_codebook, self.pixel_codebook)
        dead = (books[0].cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        n = xs.shape[0]
        pick = (torch.randperm(n, device=xs.device)[: dead.numel()] if n >= dead.numel()
                else torch.randint(0, n, (dead.numel(),), device=xs.device))
        new = U.broadcast_from_rank0(torch.cat([xs[pick], xp[pick]], dim=1))
        for book, part in zip(books, torch.split(new, [self.semantic_code_dim, self.pixel_code_dim], dim=1)):
            book.codebook.data[dead] = part.to(book.codebook.dtype)
            book.cluster_size[dead] = self.dead_code_threshold
            book.embed_sum[dead] = part * self.dead_code_threshold
        return int(dead.numel())

    def _split(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, *S, K]`` -> (semantic, pixel) indices ``[B, *S, 1]`` each."""
        k = len(self.codebook_sizes)
        check(indices.shape[-1] == k, "indices", tuple(indices.shape), f"shape [B, *spatial, {k}]")
        return (indices, indices) if k == 1 else (indices[..., :1], indices[..., 1:])

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        sem_idx, pix_idx = self._split(indices)
        out = self.pixel_codebook.indices_to_latents(pix_idx, channels_last=True)  # [B, *S, pixel_code_dim]
        if self.decoder_input == "both":
            out = torch.cat([out, self.semantic_codebook.indices_to_latents(sem_idx, channels_last=True)], dim=-1)
        return out if channels_last else out.movedim(-1, 1)

    def semantic_latents(self, indices: torch.Tensor, teacher_space: bool = False) -> torch.Tensor:
        """Semantic embeddings of tokens for understanding models: indices ``[B, *spatial, K]`` ->
        ``[B, semantic_code_dim, *spatial]`` codes, or with ``teacher_space`` the head's prediction of the
        teacher's features ``[B, semantic_dim, *spatial]``."""
        sem_idx, _ = self._split(indices)
        codes = self.semantic_codebook.indices_to_latents(sem_idx, channels_last=True)
        if teacher_space:
            codes = self.semantic_head(codes)
        return codes.movedim(-1, 1)
