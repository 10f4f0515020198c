"""Vector quantization (VQ-VAE, van den Oord et al. 2017, https://arxiv.org/abs/1711.00937).

Each latent vector is replaced by its nearest entry of a learned codebook; gradients pass to the encoder
straight through. Options follow what later work found necessary to use large codebooks well:
low-dimensional lookup and l2-normalised codes (ViT-VQGAN, https://arxiv.org/abs/2110.04627),
codebook updated by exponential moving averages instead of a loss (VQ-VAE appendix), k-means
initialisation from the first batches and restart of dead codes from recent encoder outputs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.quantizers import _gradients as G
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import Quantizer, QuantizerOutput

_NEVER = -(2**62)  # "last used" step of a code that was never assigned


class VectorQuantizer(Quantizer):
    """Nearest-neighbour codebook quantizer; ``indices[..., 1]`` (one sub-token per position).

    Args:
        dim: channels of the incoming latents.
        codebook_size: number of codes K.
        codebook_dim: dimension of the codes; when smaller than ``dim`` the lookup happens after a
            learned linear projection ``dim -> codebook_dim`` and the result is projected back.
        l2_normalize: normalise latents and codes to the unit sphere (cosine-similarity lookup).
        beta: commitment weight, ``beta * ||z - sg(q)||^2``.
        codebook_update: ``"loss"`` (codebook loss ``||sg(z) - q||^2``) or ``"ema"`` (moving averages
            of assigned latents, with Laplace smoothing of the cluster sizes).
        decay: moving-average decay of the cluster sizes (and of the codes with ``"ema"``).
        epsilon: Laplace-smoothing constant of the EMA update.
        kmeans_init_batches: when > 0, pool the latents of this many first training batches and set
            the codebook to their k-means centroids (``kmeans_iters`` Lloyd iterations).
        dead_code_threshold: codes whose moving-average assignment count per step falls below this are
            restarted from random latents of the current batch; 0 disables restarts.
        usage_window: codebook usage is the fraction of codes assigned in the last this-many steps.
        max_search_elements: about how many distances are built at once (the search goes in blocks).
        gradient: estimator for the lookup, ``"ste"`` (straight-through) or ``"rotation"`` (rotation
            trick, Fifty et al. 2024; see ``_gradients.py``), applied in the lookup space.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
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
        G.check_gradient(gradient)
        check(isinstance(dim, int) and dim >= 1, "dim", dim, "a positive integer")
        check(isinstance(codebook_size, int) and codebook_size >= 1, "codebook_size", codebook_size,
              "a positive integer (e.g. 1024, 16384)")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        check(isinstance(codebook_dim, int) and codebook_dim >= 1, "codebook_dim", codebook_dim,
              "a positive integer or null (= dim)")
        check(codebook_update in ("loss", "ema"), "codebook_update", codebook_update, "'loss' or 'ema'")
        check(0.0 < decay < 1.0, "decay", decay, "a float in (0, 1)")
        check(beta >= 0, "beta", beta, "a non-negative float")
        check(kmeans_init_batches >= 0, "kmeans_init_batches", kmeans_init_batches, "an integer >= 0")
        check(dead_code_threshold >= 0, "dead_code_threshold", dead_code_threshold, "a float >= 0")
        check(usage_window >= 1, "usage_window", usage_window, "an integer >= 1")
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.l2_normalize, self.beta, self.codebook_update = l2_normalize, beta, codebook_update
        self.decay, self.epsilon = decay, epsilon
        self.kmeans_init_batches, self.kmeans_iters = kmeans_init_batches, kmeans_iters
        self.dead_code_threshold, self.usage_window = dead_code_threshold, usage_window
        self.max_search_elements, self.gradient = max_search_elements, gradient

        projected = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projected else nn.Identity()
        codes = torch.randn(codebook_size, codebook_dim)
        self.codebook = nn.Parameter(F.normalize(codes, dim=-1) if l2_normalize else codes,
                                     requires_grad=codebook_update == "loss")
        # State lives in buffers so checkpoints, EMA copies and (later) rank syncs carry it.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_load_state_dict_post_hook(U.forget_initialized)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA of assignments/step
        self.register_buffer("embed_sum", torch.zeros(codebook_size, codebook_dim))  # EMA of sums
        self.register_buffer("last_used", torch.full((codebook_size,), _NEVER, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self._kmeans_pool: list[torch.Tensor] = []  # transient: only during the first batches

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size]

    def _codes(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codebook ``[K, codebook_dim]`` in ``dtype`` (float32, or float64 for a ``.double()`` model),
        on the unit sphere when l2-normalised."""
        codes = self.codebook.to(dtype)
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def _project_in(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.project_in(tokens)
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)  # [T, dim]
        with U.float32_math(z.device):
            dtype = U.math_dtype(tokens, self.codebook)
            x = self._project_in(tokens.to(dtype))  # [T, codebook_dim]
            # State changes only in a training forward with gradients: encode() (no_grad) never mutates.
            updating = self.training and torch.is_grad_enabled()
            if updating and not U.is_initialized(self):
                self._initialize(x.detach())
            codes = self._codes(dtype)
            idx = U.nearest_code(x.detach(), codes.detach(), self.max_search_elements, self.l2_normalize)
            q = F.embedding(idx, codes)  # [T, codebook_dim]; grad reaches codes only via the loss
            commitment = F.mse_loss(x, q.detach())
            loss = self.beta * commitment
            metrics = {"commitment": commitment.detach()}
            if self.codebook_update == "loss":
                codebook_loss = F.mse_loss(q, x.detach())
                loss = loss + codebook_loss
                metrics["codebook_loss"] = codebook_loss.detach()
            counts = U.code_counts(idx, self.codebook_size)
            if updating and U.is_initialized(self):
                metrics.update(self._update_state(x.detach(), idx, counts))
            # The value is exactly q; the gradient goes to x by the chosen estimator.
            out = self.project_out(G.with_gradient(x, q, self.gradient))
        metrics["perplexity"] = U.perplexity(counts)
        metrics["batch_usage"] = (counts > 0).float().mean()
        if self.training:
            metrics["usage"] = self.window_usage()
        indices = idx.reshape(*U.index_shape(z), 1)
        return QuantizerOutput(z_q=restore(out), indices=indices, loss=loss, metrics=metrics)

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        check(indices.shape[-1] == 1, "indices", tuple(indices.shape), "shape [B, *spatial, 1]")
        U.check_index_range(indices, self.codebook_size)
        with U.float32_math(indices.device):
            flat = indices.reshape(-1)
            out = self.project_out(F.embedding(flat, self._codes()))  # [T, dim]
        out = out.reshape(*indices.shape[:-1], self.dim)  # [B, *S, dim]
        if channels_last:
            return out
        return out.movedim(-1, 1)  # [B, *S, dim] -> [B, dim, *S]

    def window_usage(self) -> torch.Tensor:
        """Fraction of codes assigned at least once in the last ``usage_window`` training steps."""
        return ((self.step - self.last_used) <= self.usage_window).float().mean()

    # ---- training-time state: initialisation, EMA statistics, dead-code restarts -----------------

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        """Set the codebook statistics once, from k-means over the first batches or, without k-means,
        to a uniform expected count so that no code looks dead before it had a chance."""
        if self.kmeans_init_batches > 0:
            self._kmeans_pool.append(x)
            if len(self._kmeans_pool) < self.kmeans_init_batches:
                return
            pool = torch.cat(self._kmeans_pool)
            self._kmeans_pool.clear()
            centroids, counts = U.kmeans(pool, self.codebook_size, self.kmeans_iters, self.l2_normalize)
            self.codebook.data.copy_(U.broadcast_from_rank0(centroids))
            # cluster_size counts assignments per step over all ranks, as _update_state's all-reduced counts do
            per_step = U.broadcast_from_rank0(counts * x.shape[0] * U.world_size() / pool.shape[0])
        else:
            per_step = torch.full_like(self.cluster_size, x.shape[0] * U.world_size() / self.codebook_size)
        self.cluster_size.copy_(per_step)
        self.embed_sum.copy_(self.codebook.data.float() * per_step[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_state(self, x: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = U.all_reduce_sum(counts.float())
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if self.codebook_update == "ema":
            sums = U.all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, idx, x))
            self.embed_sum.lerp_(sums, 1 - self.decay)
            n = self.cluster_size.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0
            smoothed = (self.cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
            new = self.embed_sum / smoothed[:, None]
            self.codebook.data.copy_(F.normalize(new, dim=-1) if self.l2_normalize else new)
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))  # no mask indexing: no sync
        self.step += 1
        restarted = self._restart_dead_codes(x) if self.dead_code_threshold > 0 else 0
        return {"restarted_codes": torch.tensor(float(restarted))}

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor) -> int:
        """Replace codes whose moving-average count fell below the threshold by random latents of this
        batch, and reset their statistics so the revived codes do not inherit stale averages."""
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pick = (torch.randperm(x.shape[0], device=x.device)[: dead.numel()] if x.shape[0] >= dead.numel()
                else torch.randint(0, x.shape[0], (dead.numel(),), device=x.device))
        new = U.broadcast_from_rank0(x[pick].clone())
        self.codebook.data[dead] = new.to(self.codebook.dtype)
        self.cluster_size[dead] = self.dead_code_threshold
        self.embed_sum[dead] = new * self.dead_code_threshold
        return int(dead.numel())
