"""Index backpropagation quantization (IBQ, Shi et al. 2024, "Taming Scalable Visual Tokenizer for
Autoregressive Image Generation", https://arxiv.org/abs/2412.02692).

A straight-through VQ only moves the codes it picked. IBQ scores every code, ``logits = s(z, c_k) / tau``,
takes the code of the largest logit, and passes on the straight-through one-hot
``P = onehot - sg(softmax) + softmax`` times the codebook: the value is exactly the chosen code, while
the gradient reaches every code (and the encoder) through the softmax. The loss is VQ's, commitment
``beta ||z - sg(q)||^2`` plus codebook ``||q - sg(z)||^2``, and with ``double_quant`` the same two terms
again on the index-backpropagated ``q`` (the paper's double quantization loss).

The ``[tokens, K]`` softmax is never held whole: :class:`_IndexBackprop` recomputes it a block of rows
at a time in the backward (about ``max_search_elements`` logits per block), so 2^18 codes fit in the
memory of one block.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from imagetok.errors import check
from imagetok.quantizers import _utils as U
from imagetok.quantizers.base import QuantizerOutput
from imagetok.quantizers.vq import VectorQuantizer


def ibq_logits(x: torch.Tensor, codes: torch.Tensor, similarity: str, temperature: float) -> torch.Tensor:
    """``[T, D]`` x ``[K, D]`` -> logits ``[T, K]``: ``x.c / tau`` (``"dot"``) or ``-||x - c||^2 / tau``
    without the per-row constant ``||x||^2`` (``"distance"``; the softmax does not see it)."""
    if similarity == "dot":
        return x @ codes.t() / temperature
    return (2 * x @ codes.t() - codes.pow(2).sum(1)) / temperature


def index_backprop_reference(x: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor, similarity: str,
                             temperature: float) -> torch.Tensor:
    """IBQ written directly with autograd: ``(onehot - sg(p) + p) @ codes`` (memory ``[T, K]``; for tests)."""
    soft = ibq_logits(x, codes, similarity, temperature).softmax(-1)
    hard = F.one_hot(idx, codes.shape[0]).to(soft.dtype)
    return (hard - soft.detach() + soft) @ codes


class _IndexBackprop(torch.autograd.Function):
    """Forward: the chosen codes ``codes[idx]`` ``[T, D]`` (exactly, a gather). Backward, for the
    incoming ``g`` ``[T, D]`` and a block of rows at a time, with ``p = softmax(logits)``:
    the one-hot part gives ``g`` to the chosen codes; the softmax part gives
    ``dlogits = p * (g c^T - sum_k p_k (g c_k))`` to ``x`` and to every code through the logits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor, similarity: str,
                temperature: float, rows: int) -> torch.Tensor:
        ctx.save_for_backward(x, codes, idx)
        ctx.similarity, ctx.temperature, ctx.rows = similarity, temperature, rows
        return F.embedding(idx, codes)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, codes, idx = ctx.saved_tensors
        tau, rows = ctx.temperature, ctx.rows
        grad_x = torch.empty_like(x)
        grad_codes = torch.zeros_like(codes).index_add_(0, idx, g)  # the one-hot part: chosen codes only
        code_sq = codes.pow(2).sum(1) if ctx.similarity == "distance" else None
        col_sum = torch.zeros(codes.shape[0], dtype=codes.dtype, device=codes.device)  # sum over rows of dlogits
        for start in range(0, x.shape[0], rows):
            xb, gb = x[start : start + rows], g[start : start + rows]
            if code_sq is None:
                p = (xb @ codes.t() / tau).softmax(-1)  # [rows, K]
            else:
                p = torch.addmm(code_sq, xb, codes.t(), beta=-1.0, alpha=2.0).div_(tau).softmax(-1)
            gp = gb @ codes.t()  # dL/dp [rows, K]
            dlogits = p.mul_(gp - (p * gp).sum(-1, keepdim=True))  # softmax backward, in place of p
            factor = (1.0 if code_sq is None else 2.0) / tau  # d logits / d(x.c)
            grad_x[start : start + rows] = factor * (dlogits @ codes)
            grad_codes.addmm_(dlogits.t(), xb, alpha=factor)
            if code_sq is not None:
                col_sum += dlogits.sum(0)
        if code_sq is not None:  # d(-||c||^2 / tau) / dc = -2 c / tau, per row of dlogits
            grad_codes -= (2.0 / tau) * col_sum[:, None] * codes
        return grad_x, grad_codes, None, None, None, None


class IndexBackpropQuantizer(VectorQuantizer):
    """IBQ: a learned codebook whose every code gets a gradient each step; ``indices[..., 1]``.

    Args:
        dim, codebook_size, codebook_dim, beta, kmeans_init_batches, kmeans_iters, usage_window,
        max_search_elements: as in :class:`VectorQuantizer` (``max_search_elements`` also bounds the logits
            of one backward block).
        temperature: ``tau`` of the softmax over the codes (> 0); smaller is closer to the hard choice.
        similarity: ``"dot"`` (the paper: ``z.c``, the largest inner product wins) or ``"distance"``
            (``-||z - c||^2``, the nearest code wins, as plain VQ).
        l2_normalize: normalise latents and codes (then both similarities pick the same code).
        double_quant: add the commitment and codebook terms on the index-backpropagated code too.
        **vq: other :class:`VectorQuantizer` options (``decay`` of the usage statistics, ...); EMA updates,
            dead-code restarts and gradient estimators are not IBQ's (it has its own gradient).
    """

    def __init__(self, *, dim: int, codebook_size: int, temperature: float = 1.0,
                 similarity: Literal["dot", "distance"] = "dot", double_quant: bool = True, **vq: Any) -> None:
        check(temperature > 0, "temperature", temperature, "a float > 0 (the softmax temperature, e.g. 1.0)")
        check(similarity in ("dot", "distance"), "similarity", similarity,
              "'dot' (inner product, the paper) or 'distance' (negative squared distance)")
        for key, default, why in (("codebook_update", "loss", "'loss' (IBQ's codes learn by gradient)"),
                                  ("dead_code_threshold", 0.0, "0 (every IBQ code gets a gradient)"),
                                  ("gradient", "ste", "'ste' (IBQ backpropagates through the softmax instead)")):
            check(vq.get(key, default) == default, key, vq.get(key), why)
        super().__init__(dim=dim, codebook_size=codebook_size, **vq)
        self.temperature, self.similarity, self.double_quant = float(temperature), similarity, double_quant

    def _lookup(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the largest logit per row, blocked as the nearest-code search."""
        cosine = self.similarity == "dot" or self.l2_normalize  # "dot": argmax x.c, what nearest_code's cosine mode does
        return U.nearest_code(x, codes, self.max_search_elements, cosine)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)  # [T, dim]
        with U.float32_math(z.device):
            x = self._project_in(tokens.float())  # [T, codebook_dim]
            updating = self.training and torch.is_grad_enabled()
            if updating and not bool(self.initialized):
                self._initialize(x.detach())
            codes = self._codes()
            idx = self._lookup(x.detach(), codes.detach())
            q = F.embedding(idx, codes)  # [T, codebook_dim]: the hard code, for the loss
            if torch.is_grad_enabled() and (x.requires_grad or codes.requires_grad):
                rows = max(16, self.max_search_elements // max(1, self.codebook_size))
                q_ib = _IndexBackprop.apply(x, codes, idx, self.similarity, self.temperature, rows)
            else:
                q_ib = q.detach()
            commitment = F.mse_loss(x, q.detach())
            codebook_loss = F.mse_loss(q, x.detach())
            loss = self.beta * commitment + codebook_loss
            if self.double_quant:
                loss = loss + self.beta * F.mse_loss(x, q_ib.detach()) + F.mse_loss(q_ib, x.detach())
            metrics = {"commitment": commitment.detach(), "codebook_loss": codebook_loss.detach()}
            counts = torch.bincount(idx, minlength=self.codebook_size)
            if updating and bool(self.initialized):
                metrics.update(self._update_state(x.detach(), idx, counts))
            out = self.project_out(q_ib)  # value exactly q; gradient to x and every code through the softmax
        metrics["perplexity"] = U.perplexity(counts)
        metrics["batch_usage"] = (counts > 0).float().mean()
        if self.training:
            metrics["usage"] = self.window_usage()
        indices = idx.reshape(*U.index_shape(z), 1)
        return QuantizerOutput(z_q=restore(out), indices=indices, loss=loss, metrics=metrics)
