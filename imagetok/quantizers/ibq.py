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

from collections.abc import Iterator
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


class _BlockedLogits:
    """The logits ``[T, K]`` of ``x`` ``[T, D]`` against ``codes`` ``[K, D]`` one block of ``rows`` rows at a
    time (:meth:`blocks`), and the accumulation of a gradient given per block on the logits back to ``x``
    and ``codes`` (:meth:`add`, then :meth:`grads`). Memory: one ``[rows, K]`` block and a few copies."""

    def __init__(self, x: torch.Tensor, codes: torch.Tensor, similarity: str, temperature: float, rows: int) -> None:
        self.x, self.codes, self.tau, self.rows = x, codes, temperature, rows
        self.code_sq = codes.pow(2).sum(1) if similarity == "distance" else None
        self.factor = (1.0 if self.code_sq is None else 2.0) / temperature  # d logits / d(x.c)
        self.grad_x = torch.zeros_like(x)
        self.grad_codes = torch.zeros_like(codes)
        self.col_sum = torch.zeros(codes.shape[0], dtype=codes.dtype, device=codes.device)  # sum_rows dlogits

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for start in range(0, self.x.shape[0], self.rows):
            block = slice(start, start + self.rows)
            if self.code_sq is None:
                yield block, self.x[block] @ self.codes.t() / self.tau
            else:
                yield block, torch.addmm(self.code_sq, self.x[block], self.codes.t(), beta=-1.0, alpha=2.0).div_(self.tau)

    def add(self, block: slice, dlogits: torch.Tensor) -> None:
        self.grad_x[block] += self.factor * (dlogits @ self.codes)
        self.grad_codes.addmm_(dlogits.t(), self.x[block], alpha=self.factor)
        if self.code_sq is not None:
            self.col_sum += dlogits.sum(0)

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.code_sq is not None:  # d(-||c||^2 / tau) / dc = -2 c / tau, per row of dlogits
            self.grad_codes -= (2.0 / self.tau) * self.col_sum[:, None] * self.codes
        return self.grad_x, self.grad_codes


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
        logits = _BlockedLogits(x, codes, ctx.similarity, ctx.temperature, ctx.rows)
        for block, lg in logits.blocks():
            p = lg.softmax(-1)  # [rows, K]
            gp = g[block] @ codes.t()  # dL/dp [rows, K]
            logits.add(block, p.mul_(gp - (p * gp).sum(-1, keepdim=True)))  # softmax backward, in place of p
        grad_x, grad_codes = logits.grads()
        grad_codes.index_add_(0, idx, g)  # the one-hot part: the chosen codes only
        return grad_x, grad_codes, None, None, None, None


class _CodeEntropy(torch.autograd.Function):
    """Entropy penalty over the code distribution ``p = softmax(logits)`` (MAGVIT-v2's, which IBQ adopts):
    ``mean_t H(p_t) - gamma H(mean_t p_t)`` (nats), in blocks of rows forward and backward. Low per-token
    entropy makes each choice confident; high entropy of the batch average spreads the choices over
    the codebook. Returns ``[3]``: the penalty, the per-token entropy, the codebook entropy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, similarity: str, temperature: float, rows: int,
                gamma: float) -> torch.Tensor:
        logits = _BlockedLogits(x, codes, similarity, temperature, rows)
        per_token, avg = x.new_zeros(()), torch.zeros(codes.shape[0], dtype=x.dtype, device=x.device)
        for _, lg in logits.blocks():
            logp = lg.log_softmax(-1)
            p = logp.exp()
            per_token -= (p * logp).sum()
            avg += p.sum(0)
        n = x.shape[0]
        avg /= n
        log_avg = avg.clamp_min(1e-30).log()
        codebook = -(avg * log_avg).sum()
        ctx.save_for_backward(x, codes, log_avg)
        ctx.similarity, ctx.temperature, ctx.rows, ctx.gamma = similarity, temperature, rows, gamma
        return torch.stack([per_token / n - gamma * codebook, per_token / n, codebook])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, codes, log_avg = ctx.saved_tensors
        n, gamma = x.shape[0], ctx.gamma
        # d/dp_tk of [penalty, per-token, codebook] (up to constants, which the softmax backward removes)
        weight_token, weight_book = (grad[0] + grad[1]) / n, (grad[2] - gamma * grad[0]) / n
        logits = _BlockedLogits(x, codes, ctx.similarity, ctx.temperature, ctx.rows)
        for block, lg in logits.blocks():
            logp = lg.log_softmax(-1)
            p = logp.exp()
            dp = -weight_token * logp - weight_book * log_avg  # [rows, K]
            logits.add(block, p * (dp - (p * dp).sum(-1, keepdim=True)))
        grad_x, grad_codes = logits.grads()
        return grad_x, grad_codes, None, None, None, None


def code_entropy_reference(x: torch.Tensor, codes: torch.Tensor, similarity: str, temperature: float,
                           gamma: float) -> torch.Tensor:
    """:class:`_CodeEntropy` written directly with autograd (memory ``[T, K]``; for tests)."""
    logp = ibq_logits(x, codes, similarity, temperature).log_softmax(-1)
    per_token = -(logp.exp() * logp).sum(-1).mean()
    avg = logp.exp().mean(0)
    codebook = -(avg * avg.clamp_min(1e-30).log()).sum()
    return torch.stack([per_token - gamma * codebook, per_token, codebook])


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
        entropy_weight: weight of the entropy penalty ``mean H(p_t) - entropy_gamma H(mean p_t)`` over the
            softmax (MAGVIT-v2's, adopted by IBQ), computed in blocks; 0 turns it off (training only).
        entropy_gamma: weight of the codebook-entropy term inside the penalty.
        straight_through: also pass the gradient to the latents straight through (identity), as VQ does,
            on top of the softmax path. Not in the paper, where the latents learn through the softmax
            only; that path vanishes when the softmax is peaked (see ``docs`` ladder notes).
        entropy_temperature: temperature of the penalty's own softmax (None = ``temperature``); MAGVIT-v2
            style penalties use a much sharper one (e.g. 0.01) than the quantization softmax.
        **vq: other :class:`VectorQuantizer` options (``decay`` of the usage statistics, ...); EMA updates,
            dead-code restarts and gradient estimators are not IBQ's (it has its own gradient).
    """

    def __init__(self, *, dim: int, codebook_size: int, temperature: float = 1.0,
                 similarity: Literal["dot", "distance"] = "dot", double_quant: bool = True,
                 entropy_weight: float = 0.0, entropy_gamma: float = 1.0, entropy_temperature: float | None = None,
                 straight_through: bool = False, **vq: Any) -> None:
        check(temperature > 0, "temperature", temperature, "a float > 0 (the softmax temperature, e.g. 1.0)")
        check(similarity in ("dot", "distance"), "similarity", similarity,
              "'dot' (inner product, the paper) or 'distance' (negative squared distance)")
        check(entropy_weight >= 0, "entropy_weight", entropy_weight, "a float >= 0 (0 = no entropy penalty)")
        check(entropy_gamma >= 0, "entropy_gamma", entropy_gamma, "a float >= 0")
        check(entropy_temperature is None or entropy_temperature > 0, "entropy_temperature", entropy_temperature,
              "null (= temperature) or a float > 0")
        for key, default, why in (("codebook_update", "loss", "'loss' (IBQ's codes learn by gradient)"),
                                  ("dead_code_threshold", 0.0, "0 (every IBQ code gets a gradient)"),
                                  ("gradient", "ste", "'ste' (IBQ backpropagates through the softmax instead)")):
            check(vq.get(key, default) == default, key, vq.get(key), why)
        super().__init__(dim=dim, codebook_size=codebook_size, **vq)
        self.temperature, self.similarity, self.double_quant = float(temperature), similarity, double_quant
        self.entropy_weight, self.entropy_gamma = float(entropy_weight), float(entropy_gamma)
        self.entropy_temperature = float(temperature if entropy_temperature is None else entropy_temperature)
        self.straight_through = straight_through

    def _lookup(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the largest logit per row, blocked as the nearest-code search."""
        cosine = self.similarity == "dot" or self.l2_normalize  # "dot": argmax x.c, what nearest_code's cosine mode does
        return U.nearest_code(x, codes, self.max_search_elements, cosine)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)  # [T, dim]
        with U.float32_math(z.device):
            x = self._project_in(tokens.float())  # [T, codebook_dim]
            updating = self.training and torch.is_grad_enabled()
            if updating and not U.is_initialized(self):
                self._initialize(x.detach())
            codes = self._codes()
            idx = self._lookup(x.detach(), codes.detach())
            q = F.embedding(idx, codes)  # [T, codebook_dim]: the hard code, for the loss
            rows = max(16, self.max_search_elements // max(1, self.codebook_size))
            differentiable = torch.is_grad_enabled() and (x.requires_grad or codes.requires_grad)
            q_ib = (_IndexBackprop.apply(x, codes, idx, self.similarity, self.temperature, rows) if differentiable
                    else q.detach())
            commitment = F.mse_loss(x, q.detach())
            codebook_loss = F.mse_loss(q, x.detach())
            loss = self.beta * commitment + codebook_loss
            if self.double_quant:
                loss = loss + self.beta * F.mse_loss(x, q_ib.detach()) + F.mse_loss(q_ib, x.detach())
            metrics = {"commitment": commitment.detach(), "codebook_loss": codebook_loss.detach()}
            if self.entropy_weight > 0 and differentiable and self.training:
                entropy = _CodeEntropy.apply(x, codes, self.similarity, self.entropy_temperature, rows,
                                             self.entropy_gamma)
                loss = loss + self.entropy_weight * entropy[0]
                metrics["entropy/per_token"], metrics["entropy/codebook"] = entropy[1].detach(), entropy[2].detach()
            counts = U.code_counts(idx, self.codebook_size)
            if updating and U.is_initialized(self):
                metrics.update(self._update_state(x.detach(), idx, counts))
            if self.straight_through:  # value unchanged (x - sg(x) is exactly 0)
                q_ib = q_ib + (x - x.detach())
            out = self.project_out(q_ib)  # value exactly q; gradient to x and every code through the softmax
        metrics["perplexity"] = U.perplexity(counts)
        metrics["batch_usage"] = (counts > 0).float().mean()
        if self.training:
            metrics["usage"] = self.window_usage()
        indices = idx.reshape(*U.index_shape(z), 1)
        return QuantizerOutput(z_q=restore(out), indices=indices, loss=loss, metrics=metrics)
