"""Shared machinery of the binary, lookup-free quantizers (LFQ in ``lfq.py``, BSQ in ``bsq.py``).

A binary quantizer maps each token to ``d`` bits. The implicit codebook has ``2^d`` codes, far too many
to enumerate for ``d = 128``, so nothing here ever builds a ``2^d`` tensor:

* **Indices.** The ``d`` bits are emitted as ``G = d / bits_per_token`` sub-tokens; sub-token ``k`` is
  the little-endian number of bits ``k*b .. (k+1)*b - 1`` (bit ``j`` of the group is worth ``2^j``), so
  every sub-token lies in ``[0, 2^b)`` and fits an integer tensor and a downstream vocabulary. A list
  ``bits_per_token=[6, 12]`` splits the bits unequally, in order (Open-MAGVIT2's asymmetric factorisation).
* **Entropy.** Both papers' soft assignment of a token to the codes is a softmax over ``2^d`` codes
  whose logits are a sum over dimensions, so it is a *product of independent per-bit Bernoullis* with
  per-bit logits ``l_i``. Hence the per-sample entropy ``E_x[H(p(c|x))]`` is computed exactly as a sum
  of binary entropies, for any ``d``. The codebook entropy ``H(E_x[p(c|x)])`` (entropy of the
  batch-mean distribution) does not factorise; it is approximated by splitting the bits into groups of
  ``entropy_group_bits`` and summing the exact entropies of each group's batch-mean distribution over
  its ``2^g`` sub-codes. By subadditivity this sum is an **upper bound** of the joint codebook entropy,
  equal to it when one group covers all bits (or when groups are independent). Within a group the
  bits are independent given ``x`` too, so the ``2^g`` table is never built per token: each half of
  the group's bits gets its distribution over ``2^(g/2)`` sub-codes, and the batch mean of their
  product is one matrix product per group (``mean_t p_lo[t]^T p_hi[t]``). Memory is
  ``T x (d/g) x 2 x 2^(g/2)`` floats for ``T`` tokens (plus ``(d/g) x 2^g``), independent of ``2^d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import check
from imagetok.quantizers import _utils as U
from imagetok.quantizers._utils import count_statistics
from imagetok.quantizers.base import Quantizer, QuantizerOutput

MAX_TOKEN_BITS = 62  # a sub-token must fit a signed int64 with room to spare (counted sparsely in evaluation)


def bits_to_subtokens(bits: torch.Tensor, bits_per_token: int | Sequence[int]) -> torch.Tensor:
    """Bits ``[..., d]`` (bool) -> LongTensor ``[..., d / bits_per_token]``, each in ``[0, 2^b)``; with a list
    of sizes (summing to ``d``) ``[..., len(sizes)]``, sub-token ``k`` in ``[0, 2^sizes[k])``."""
    if not isinstance(bits_per_token, int):
        return torch.cat([bits_to_subtokens(part, part.shape[-1]) for part in bits.split(list(bits_per_token), -1)], -1)
    weights = 2 ** torch.arange(bits_per_token, device=bits.device, dtype=torch.long)
    grouped = bits.reshape(*bits.shape[:-1], -1, bits_per_token).long()
    return (grouped * weights).sum(-1)


def subtokens_to_bits(indices: torch.Tensor, bits_per_token: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`bits_to_subtokens`: LongTensor ``[..., G]`` -> bool ``[..., G * b]`` (``[..., sum(sizes)]``)."""
    if not isinstance(bits_per_token, int):
        return torch.cat([subtokens_to_bits(indices[..., k:k + 1], size) for k, size in enumerate(bits_per_token)], -1)
    shifts = torch.arange(bits_per_token, device=indices.device, dtype=torch.long)
    return ((indices.long().unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of Bernoulli(sigmoid(logits)), elementwise, stable for large ``|logits|``."""
    # H is even in the logit; with a = |l| it is softplus(-a) + a sigmoid(-a): two non-negative
    # terms, no cancellation (softplus(l) - l sigmoid(l) would lose it all for large l)
    a = logits.abs()
    return F.softplus(-a) + a * torch.sigmoid(-a)


def group_code_bits(group_bits: int) -> torch.Tensor:
    """All ``2^g`` sub-codes of a group as float bits ``[2^g, g]`` (row ``c`` holds ``c``'s bits, LSB first)."""
    return subtokens_to_bits(torch.arange(2**group_bits)[:, None], group_bits).float()


def soft_entropies(logits: torch.Tensor, group_bits: int, codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy terms of the factorised soft assignment given per-bit logits ``[T, d]`` (float32).

    Returns ``(per_sample, codebook)`` in nats: ``per_sample`` is the exact mean over tokens of the
    entropy of ``p(c|x)`` (sum of per-bit binary entropies); ``codebook`` ``[d / g]`` holds, per group
    of ``g`` bits, the exact entropy of the batch-mean distribution over the group's ``2^g``
    sub-codes. ``codebook.sum()`` upper-bounds the joint codebook entropy (see module docstring).
    ``codes``: ``group_code_bits(ceil(g / 2))``, passed in to avoid rebuilding it every step.
    """
    t, d = logits.shape
    n, lo = d // group_bits, group_bits // 2  # groups; bits of a group's lower half (the upper has g - lo)
    codes = group_code_bits(group_bits - lo).to(logits) if codes is None else codes  # [2^hi, hi]
    per_sample = binary_entropy(logits).sum(-1).mean()
    grouped = logits.reshape(t, n, group_bits)  # [T, n, g]
    # log p(c | x) over a half's sub-codes = sum_i c_i l_i + const: a softmax over 2^(g/2) entries
    p_hi = torch.softmax(grouped[..., lo:] @ codes.t(), dim=-1)  # [T, n, 2^hi]
    if lo == 0:
        mean_probs = p_hi.mean(0)  # [n, 2]
    else:
        # the first 2^lo rows of the upper half's codes are the lower half's codes (high bits 0)
        p_lo = torch.softmax(grouped[..., :lo] @ codes[: 2**lo, :lo].t(), dim=-1)  # [T, n, 2^lo]
        # batch mean of the product distribution, sub-code a + 2^lo * b: one GEMM per group
        mean_probs = torch.bmm(p_hi.permute(1, 2, 0), p_lo.transpose(0, 1)).reshape(n, 2**group_bits) / t  # [n, 2^g]
    codebook = -(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum(-1)
    return per_sample, codebook


class BinaryQuantizer(Quantizer):
    """Base of LFQ and BSQ: ``d`` bits per token emitted as ``G`` sub-tokens, factorised entropy loss.

    Subclasses implement :meth:`_binarize` (latents -> bits, straight-through values, per-bit logits)
    and :meth:`_codes` (bits -> quantized values); everything else (indices, inverse, losses, metrics,
    state) lives here. See the module docstring for the index layout and the entropy approximation.

    Args:
        dim: channels of the incoming latents; when it differs from ``bits`` linear projections map
            ``dim -> bits`` before binarisation and ``bits -> dim`` after.
        bits: number of binary dimensions ``d`` (implicit codebook of ``2^d`` codes).
        bits_per_token: bits per emitted sub-token ``b`` (divides ``bits``, at most 62); null = ``bits``; a
            list (e.g. ``[6, 12]``, summing to ``bits``) gives sub-tokens of those sizes, in bit order.
        entropy_group_bits: bits per group of the codebook-entropy estimate ``g`` (divides ``bits``, at
            most 16); memory of the estimate is about ``T x (d/g) x 2^(g/2 + 1)`` floats. Null = the
            largest divisor of ``bits`` not above ``min(b, 12)`` (18 bits as one token: 9; 128 bits as
            16-bit tokens: 8).
        entropy_weight: weight of the entropy loss ``H_sample - codebook_entropy_weight * H_codebook``.
        codebook_entropy_weight: the papers' ``gamma``, weight of the codebook (diversity) term.
        commitment_weight: weight of the commitment loss ``mean((v - sg(q))^2)``.
        inv_temperature: scales the per-bit logits of the soft assignment.
        bit_decay: decay of the moving average of per-bit frequencies (the ``bit_entropy_bits`` metric).

    The entropy terms are computed only in a training forward or with gradients enabled: a no-grad
    eval forward (``encode``, validation) returns the commitment term alone in ``loss``.
    """

    def __init__(self, *, dim: int, bits: int, bits_per_token: int | Sequence[int] | None, entropy_group_bits: int | None,
                 entropy_weight: float, codebook_entropy_weight: float, commitment_weight: float,
                 inv_temperature: float, bit_decay: float = 0.99) -> None:
        super().__init__()
        check(isinstance(dim, int) and dim >= 1, "dim", dim, "a positive integer")
        check(isinstance(bits, int) and bits >= 1, "bits", bits, "a positive integer (e.g. 18, 128)")
        # null = every bit in one sub-token; beyond 62 bits a token has no integer to live in
        check(bits_per_token is not None or bits <= MAX_TOKEN_BITS, "bits_per_token", bits_per_token,
              f"a divisor of bits={bits} in [1, {MAX_TOKEN_BITS}] (e.g. 16): null puts all {bits} bits in one "
              f"sub-token, which works only up to {MAX_TOKEN_BITS} bits")
        bits_per_token = bits if bits_per_token is None else bits_per_token
        if isinstance(bits_per_token, int):
            check(1 <= bits_per_token <= MAX_TOKEN_BITS and bits % bits_per_token == 0,
                  "bits_per_token", bits_per_token, f"a divisor of bits={bits} in [1, {MAX_TOKEN_BITS}] (e.g. 16)")
            token_bits = [bits_per_token] * (bits // bits_per_token)
        else:
            token_bits = list(bits_per_token)
            check(all(isinstance(b, int) and 1 <= b <= MAX_TOKEN_BITS for b in token_bits) and sum(token_bits) == bits,
                  "bits_per_token", token_bits, f"sizes in [1, {MAX_TOKEN_BITS}] summing to bits={bits} (e.g. [6, 12])")
            # equal parts: the plain integer form
            bits_per_token = token_bits[0] if len(set(token_bits)) == 1 else token_bits
        if entropy_group_bits is None:
            # the largest group that divides the bits: falling back to 1 (fully factorised) would lose
            # every within-group correlation, e.g. for 14 or 18 bits as a single token
            cap = min(*token_bits, 12)
            entropy_group_bits = max(g for g in range(1, cap + 1) if bits % g == 0)
        check(isinstance(entropy_group_bits, int) and 1 <= entropy_group_bits <= 16 and bits % entropy_group_bits == 0,
              "entropy_group_bits", entropy_group_bits, f"a divisor of bits={bits} in [1, 16]")
        for key, value in (("entropy_weight", entropy_weight), ("codebook_entropy_weight", codebook_entropy_weight),
                           ("commitment_weight", commitment_weight)):
            check(value >= 0, key, value, "a non-negative float")
        check(inv_temperature > 0, "inv_temperature", inv_temperature, "a positive float")
        check(0.0 < bit_decay < 1.0, "bit_decay", bit_decay, "a float in (0, 1)")
        self.dim, self.bits, self.bits_per_token, self.entropy_group_bits = dim, bits, bits_per_token, entropy_group_bits
        self.token_bits = token_bits  # bits of each sub-token, in order
        self.num_tokens = len(token_bits)
        self.entropy_weight, self.codebook_entropy_weight = entropy_weight, codebook_entropy_weight
        self.commitment_weight, self.inv_temperature, self.bit_decay = commitment_weight, inv_temperature, bit_decay
        projected = dim != bits
        self.project_in = nn.Linear(dim, bits) if projected else nn.Identity()
        self.project_out = nn.Linear(bits, dim) if projected else nn.Identity()
        # sub-codes of the upper half of an entropy group (soft_entropies)
        self.register_buffer("_group_codes", group_code_bits(entropy_group_bits - entropy_group_bits // 2), persistent=False)
        # moving average of P(bit = 1) over training steps: the one piece of state, summed over ranks
        self.register_buffer("bit_mean", torch.full((bits,), 0.5))

    @property
    def codebook_sizes(self) -> list[int]:
        return [2**b for b in self.token_bits]

    def _binarize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected tokens ``[T, d]`` (float32) -> ``(bits, q_st, v, logits)``: bool bits ``[T, d]``,
        straight-through quantized values ``[T, d]`` (value exactly ``_codes(bits)``), the continuous
        values ``v`` the commitment loss pulls towards ``q``, and per-bit logits ``[T, d]`` of the soft
        assignment ``log p(bit=1|x) - log p(bit=0|x)``."""
        raise NotImplementedError

    def _codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bool bits ``[..., d]`` -> quantized values ``[..., d]`` (float32)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        tokens, restore = U.to_tokens(z)  # [T, dim]
        with U.float32_math(z.device):
            x = self.project_in(tokens.float())  # [T, d]
            bits, q_st, v, logits = self._binarize(x)
            q = q_st.detach()
            commitment = F.mse_loss(v, q)
            loss = self.commitment_weight * commitment
            metrics = {"commitment": commitment.detach()}
            if self.training or torch.is_grad_enabled():
                per_sample, codebook = soft_entropies(logits, self.entropy_group_bits, self._group_codes)
                loss = loss + self.entropy_weight * (per_sample - self.codebook_entropy_weight * codebook.sum())
                metrics["per_sample_entropy"] = per_sample.detach()
                metrics["codebook_entropy"] = codebook.sum().detach()  # nats, upper bound when grouped
            if self.training and torch.is_grad_enabled():
                self._update_bit_mean(bits)
            out = self.project_out(q_st)
            idx = bits_to_subtokens(bits, self.bits_per_token)  # [T, G]
        metrics.update(self._usage_metrics(idx))
        return QuantizerOutput(z_q=restore(out), indices=idx.reshape(*U.index_shape(z), self.num_tokens),
                               loss=loss, metrics=metrics)

    def indices_to_latents(self, indices: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        check(indices.shape[-1] == self.num_tokens, "indices", tuple(indices.shape),
              f"shape [B, *spatial, {self.num_tokens}]")
        U.check_index_range(indices, self.codebook_sizes)
        with U.float32_math(indices.device):
            bits = subtokens_to_bits(indices.reshape(-1, self.num_tokens), self.bits_per_token)  # [T, d]
            out = self.project_out(self._codes(bits))  # [T, dim]
        out = out.reshape(*indices.shape[:-1], self.dim)
        return out if channels_last else out.movedim(-1, 1)

    @torch.no_grad()
    def _update_bit_mean(self, bits: torch.Tensor) -> None:
        stats = U.all_reduce_sum(torch.cat([bits.float().sum(0), bits.new_full((1,), bits.shape[0], dtype=torch.float)]))
        self.bit_mean.lerp_(stats[:-1] / stats[-1].clamp_min(1), 1 - self.bit_decay)

    def _usage_metrics(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per sub-codebook batch usage, perplexity and entropy (``*_k`` keys when ``G > 1``), their
        means, and ``bit_entropy_bits``: the summed entropy of the moving-average bit frequencies, an
        upper bound (in bits, at most ``d``) of the code entropy over recent training steps."""
        per_token = [count_statistics(idx[:, k], size) for k, size in enumerate(self.codebook_sizes)]
        metrics = {name: torch.stack([s[name] for s in per_token]).mean() for name in per_token[0]}
        metrics["entropy_bits"] = metrics["entropy_bits"] * self.num_tokens  # sum over sub-tokens
        if self.num_tokens > 1:
            metrics.update({f"{name}_{k}": v for k, s in enumerate(per_token) for name, v in s.items()})
        metrics["bit_entropy_bits"] = binary_entropy(torch.logit(self.bit_mean.clamp(1e-6, 1 - 1e-6))).sum() / math.log(2)
        return metrics
