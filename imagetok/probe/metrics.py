"""The probe's numbers, all from held-out negative log-likelihoods, and the unigram baseline.

Definitions (``K`` sub-tokens per position, ``L`` positions per image, ``H x W`` source pixels):

- ``nll_nats_per_position``: mean over held-out positions of the NLL summed over the position's ``K``
  sub-tokens (nats); ``bits_per_position`` = that / ln 2. A *position* is one grid cell, one 1D token or
  one multi-scale token, whatever ``probe.subtokens`` is, so the figures compare across both modes.
- ``nll_nats_per_subtoken`` / ``bits_per_subtoken``: the same divided by ``K``; ``bits_per_subcodebook``
  splits ``bits_per_position`` into its ``K`` terms.
- ``bits_per_image`` = ``bits_per_position * L``; ``bits_per_pixel`` = ``bits_per_image / (H * W)``.
- ``unigram_entropy_bits_per_position``: the sum over sub-codebooks of the unigram (code frequency)
  entropy of the *training* tokens: the bits per position of a model that draws every sub-token from
  its code frequencies alone; ``..._per_subtoken`` is that divided by ``K``.
- ``gap_bits_per_position`` = unigram entropy - held-out bits per position (and ``gap_bits_per_subtoken``):
  positive when the probe found structure beyond code frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from imagetok.data.token_shards import TokenShards
from imagetok.evaluation.tokens import token_statistics

BINCOUNT_LIMIT = 1 << 24  # larger codebooks are counted by np.unique (only the codes that occur)


def shard_code_counts(shards: TokenShards) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact code counts of every sub-codebook over all tokens of ``shards``, read shard by shard
    (bounded memory): ``K`` pairs ``(codes, counts)`` of the codes that occur, int64."""
    sizes = [int(v) for v in shards.index["codebook_sizes"]]
    totals: list[Any] = [np.zeros(v, dtype=np.int64) if v <= BINCOUNT_LIMIT else {} for v in sizes]
    for s in range(len(shards.index["shards"])):
        flat = np.asarray(shards._shard(s)).reshape(-1, len(sizes))
        for k, size in enumerate(sizes):
            if size <= BINCOUNT_LIMIT:
                totals[k] += np.bincount(flat[:, k].astype(np.int64), minlength=size)[:size]
            else:
                for code, count in zip(*np.unique(flat[:, k], return_counts=True)):
                    totals[k][int(code)] = totals[k].get(int(code), 0) + int(count)
    pairs = []
    for total in totals:
        if isinstance(total, dict):
            codes = np.array(sorted(total), dtype=np.int64)
            pairs.append((codes, np.array([total[c] for c in codes], dtype=np.int64)))
        else:
            used = np.flatnonzero(total)
            pairs.append((used, total[used]))
    return pairs


def unigram_statistics(shards: TokenShards) -> list[dict[str, float]]:
    """:func:`~imagetok.evaluation.tokens.token_statistics` (usage, perplexity, ``entropy_bits``, Zipf
    exponent) of each sub-codebook over every token of ``shards``."""
    sizes = [int(v) for v in shards.index["codebook_sizes"]]
    return [token_statistics(torch.from_numpy(counts), size) for (_, counts), size in zip(shard_code_counts(shards), sizes)]


def probe_metrics(nll_nats_per_subcodebook: list[float], positions: int, image_size: int | None,
                  unigram_bits_per_subcodebook: list[float]) -> dict[str, Any]:
    """The figures of the module docstring from the held-out mean NLL of each sub-codebook (nats per
    position, ``K`` values), ``L`` = ``positions``, the source side ``image_size`` (None: no bits per
    pixel) and the training tokens' unigram entropy per sub-codebook (bits)."""
    K = len(nll_nats_per_subcodebook)
    nats = float(sum(nll_nats_per_subcodebook))
    bits = nats / math.log(2)
    unigram = float(sum(unigram_bits_per_subcodebook))
    out = {"nll_nats_per_position": nats, "nll_nats_per_subtoken": nats / K,
           "bits_per_position": bits, "bits_per_subtoken": bits / K,
           "bits_per_subcodebook": [v / math.log(2) for v in nll_nats_per_subcodebook],
           "bits_per_image": bits * positions,
           "bits_per_pixel": bits * positions / image_size**2 if image_size else None,
           "unigram_entropy_bits_per_position": unigram, "unigram_entropy_bits_per_subtoken": unigram / K,
           "gap_bits_per_position": unigram - bits, "gap_bits_per_subtoken": (unigram - bits) / K}
    return out
