"""Token statistics over a whole evaluation split, from exact per-code counts (``CodebookUsage``)."""

from __future__ import annotations

import math

import torch


def zipf_exponent(counts: torch.Tensor) -> float:
    """Exponent ``s`` of the least-squares fit ``log f(r) = c - s log r`` of the rank-frequency curve
    of the codes used at least once (``counts`` ``[K]``); NaN with fewer than 2 used codes."""
    freq = counts[counts > 0].double().sort(descending=True).values
    if freq.numel() < 2:
        return float("nan")
    log_rank = torch.log(torch.arange(1, freq.numel() + 1, dtype=torch.float64))
    log_freq = torch.log(freq)
    x, y = log_rank - log_rank.mean(), log_freq - log_freq.mean()
    return float(-(x * y).sum() / (x * x).sum())


def token_statistics(counts: torch.Tensor, codebook_size: int | None = None) -> dict[str, float]:
    """For one sub-codebook's counts: ``usage`` (codes used at least once / size, in [0, 1]),
    ``perplexity`` (exp of the unigram entropy, in [1, size]), ``entropy_bits`` (unigram entropy in
    bits, at most log2 size), ``zipf_exponent``, ``tokens`` (how many were counted) and ``codebook_size``.

    ``counts``: one count per code ``[size]``, or only the used codes' counts (``CodeCounts.counts``)
    together with ``codebook_size``, for codebooks too large to list (zeros never matter here)."""
    size = int(counts.numel()) if codebook_size is None else int(codebook_size)
    total = int(counts.sum())
    probs = counts.double() / max(total, 1)
    nonzero = probs[probs > 0]
    entropy_nats = float(-(nonzero * nonzero.log()).sum())
    return {"usage": int((counts > 0).sum()) / size, "perplexity": math.exp(entropy_nats),
            "entropy_bits": entropy_nats / math.log(2), "zipf_exponent": zipf_exponent(counts),
            "tokens": total, "codebook_size": size}
