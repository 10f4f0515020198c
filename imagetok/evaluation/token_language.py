"""Statistics of token sequences: how predictable a tokenizer's indices are from their neighbours and
how far apart they still inform each other, how their vocabulary grows, and how well general-purpose
compressors shrink them. After "Analyzing the Language of Visual Tokens" (Chan et al., 2024,
arXiv:2411.05001), which compares these numbers for visual tokens with those of natural languages.

Input, for one sub-codebook of ``V`` codes: a LongTensor ``[N, h, w]`` (N images' token grids, read in
raster order, row after row) or ``[N, L]`` (N 1D sequences, e.g. latent tokens, or the multi-scale
quantizer's scales one after another), every code in ``[0, V)``. Statistics never span two images. The
"stream" of a set is its images' raster sequences concatenated in order (used for Heaps' law and for
compression, where order matters).

Every entropy is in bits and is a plug-in estimate: the entropy of the empirical distribution of the
given tokens (in-sample; only :func:`held_out_bigram_perplexity` scores tokens it did not count). Plug-in
estimates are biased: an entropy over ``S`` occupied cells from ``n`` samples is low by about
``(S - 1) / (2 n ln 2)`` bits (Miller-Madow), so a conditional entropy ``H(X | C) = H(X, C) - H(C)`` is
low by about ``(S_XC - S_C) / (2 n ln 2)``, which is far from small once the contexts are not many
times fewer than the samples (a context seen once predicts its token perfectly: with a 2^14 codebook
the 2^28 possible (left, up) pairs outnumber any evaluation split's tokens). A mutual information is
high by about ``(S_A - 1)(S_B - 1) / (2 n ln 2)`` for independent variables. The number of positions
counted (``tokens``) and of distinct contexts are reported so the reader can judge.

Codes are never indexed into dense ``V``- or ``V^2``-sized tables: tuples of codes become ids by
sorting (see :func:`joint_ids`), so any codebook size works, 2^62-code binary ones included.
"""

from __future__ import annotations

import lzma
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_DISTANCE = 8
DEFAULT_HEAPS_POINTS = 32
DEFAULT_MAX_IMAGES = 10_000  # what eval.token_language_max_images defaults to, and shards alike
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]  # raw LZMA2 (no .xz container bytes), the default preset
PROTOCOL = ("plug-in (in-sample) estimates in bits over the kept images' tokens, per sub-codebook; grids in raster "
            "order, contexts within an image only; zlib level 9 and raw LZMA2 preset 6 on the index stream at the "
            "minimum whole number of bytes per token (little-endian); raw bits = ceil(log2 V) per token")


Tokens = torch.Tensor | np.ndarray  # integer codes; a tensor is read on the CPU


def _array(tokens: Tokens) -> np.ndarray:
    return np.asarray(tokens.detach().cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)


def joint_ids(*columns: Tokens) -> np.ndarray:
    """Ids in ``[0, U)`` of the distinct tuples ``(columns[0][i], columns[1][i], ...)`` (columns of equal
    size, read flat; any int64 values), equal ids for equal tuples. Columns are folded in one at a time,
    each key ``id * U_next + id_next`` below ``n^2``, so no key overflows int64 whatever the codebook size.
    (NumPy's single-threaded sort: torch's CPU sort is several times slower on 2 busy cores.)"""
    ids = np.unique(_array(columns[0]).ravel(), return_inverse=True)[1].ravel()
    for column in columns[1:]:
        other = np.unique(_array(column).ravel(), return_inverse=True)[1].ravel()
        ids = np.unique(ids * (int(other.max()) + 1) + other, return_inverse=True)[1].ravel()
    return ids


def entropy_bits(ids: Tokens) -> float:
    """Plug-in entropy ``-sum_a p(a) log2 p(a)`` (bits) of the empirical distribution of ``ids`` (any
    integers, any shape); NaN when empty."""
    values = _array(ids).ravel()
    if values.size == 0:
        return float("nan")
    counts = np.unique(values, return_counts=True)[1].astype(np.float64)
    return max(0.0, float(math.log2(values.size) - (counts * np.log2(counts)).sum() / values.size))


def conditional_entropy_bits(target: Tokens, *context: Tokens) -> float:
    """Plug-in ``H(X | C) = H(X, C) - H(C)`` in bits, ``X`` the values of ``target``, ``C`` the tuple of
    the ``context`` arrays at the same positions (all of one shape); ``H(X)`` without context."""
    if not context:
        return entropy_bits(target)
    if _array(target).size == 0:
        return float("nan")
    return max(0.0, entropy_bits(joint_ids(target, *context)) - entropy_bits(joint_ids(*context)))


def conditional_entropy_left_up(tokens: Tokens) -> float:
    """``H(x[r, c] | x[r, c-1], x[r-1, c])`` in bits over a grid ``[N, h, w]``: every position with both
    a left and an upper neighbour (the first row and column are not predicted, ``N (h-1)(w-1)``
    positions); NaN when ``h`` or ``w`` is 1."""
    x = _array(tokens)
    return conditional_entropy_bits(x[:, 1:, 1:], x[:, 1:, :-1], x[:, :-1, 1:])


def conditional_entropy_left(tokens: Tokens) -> float:
    """``H(x[.., t] | x[.., t-1])`` in bits along the last axis: the left neighbour in a grid ``[N, h, w]``
    (the first column not predicted, no wrap to the row above), the previous token of ``[N, L]``."""
    x = _array(tokens)
    return conditional_entropy_bits(x[..., 1:], x[..., :-1])


def _raster(tokens: Tokens) -> np.ndarray:
    """``[N, h, w]`` or ``[N, L]`` -> ``[N, T]``, each image's tokens in raster order."""
    x = _array(tokens)
    return x.reshape(x.shape[0], -1)


def bigram_perplexity(tokens: Tokens) -> float:
    """In-sample bigram perplexity ``2^H(x_t | x_{t-1})`` (in [1, V]) over each image's raster sequence,
    ``t = 1 .. T-1`` (row ends wrap to the next row's start, as an autoregressive model reads a grid):
    the perplexity on these tokens of the bigram model fitted to them (plug-in, so optimistic; see
    :func:`held_out_bigram_perplexity`)."""
    return 2.0 ** conditional_entropy_left(_raster(tokens))


def held_out_bigram_perplexity(tokens: Tokens, held_out: Tokens, codebook_size: int, alpha: float = 1.0) -> float:
    """Perplexity ``2^(-mean log2 q(b | a))`` of the raster bigrams ``(a, b)`` of ``held_out`` under the
    add-``alpha`` bigram model counted on ``tokens``: ``q(b | a) = (n(a, b) + alpha) / (n(a) + alpha V)``,
    ``n`` the counts of pairs and of first tokens among ``tokens``' bigrams, ``V = codebook_size``."""
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r}: add-alpha smoothing needs alpha > 0")
    fit, test = _raster(tokens), _raster(held_out)
    first = np.concatenate([fit[:, :-1].ravel(), test[:, :-1].ravel()])
    second = np.concatenate([fit[:, 1:].ravel(), test[:, 1:].ravel()])
    n_fit = fit[:, 1:].size
    if n_fit == 0 or first.size == n_fit:
        return float("nan")
    pair, context = joint_ids(first, second), joint_ids(first)
    pair_counts = np.bincount(pair[:n_fit], minlength=int(pair.max()) + 1).astype(np.float64)
    context_counts = np.bincount(context[:n_fit], minlength=int(context.max()) + 1).astype(np.float64)
    log_q = (np.log2(pair_counts[pair[n_fit:]] + alpha)
             - np.log2(context_counts[context[n_fit:]] + alpha * float(codebook_size)))
    return float(2.0 ** -log_q.mean())


def mutual_information(tokens: Tokens, max_distance: int = DEFAULT_MAX_DISTANCE) -> list[float]:
    """Plug-in ``I(x_i; x_{i+d}) = H(A) + H(B) - H(A, B)`` in bits for ``d = 1 .. min(max_distance,
    T-1)``, ``T`` the last axis' length (entry ``d-1`` is distance ``d``): ``(A, B)`` are the pairs
    ``(x[.., t], x[.., t+d])`` pooled over every ``t`` and image, i.e. horizontal distance within a
    row of a grid ``[N, h, w]``, distance along ``[N, L]``."""
    x = _array(tokens)
    out = []
    for d in range(1, min(max_distance, x.shape[-1] - 1) + 1):
        a, b = x[..., :-d], x[..., d:]
        out.append(max(0.0, entropy_bits(a) + entropy_bits(b) - entropy_bits(joint_ids(a, b))))
    return out


def heaps_curve(stream: Tokens, num_points: int = DEFAULT_HEAPS_POINTS) -> tuple[list[int], list[int]]:
    """Heaps' law data of a token stream (any shape, read flat): ``(n, V(n))`` at up to ``num_points``
    log-spaced ``n`` in ``[1, len]`` (the last is ``len``), ``V(n)`` the distinct codes among the first
    ``n`` tokens."""
    flat = _array(stream).ravel()
    if flat.size == 0:
        return [], []
    first_seen = np.sort(np.unique(flat, return_index=True)[1])  # where each distinct code first occurs
    seen = np.unique(np.round(np.logspace(0, math.log10(flat.size), num_points)).astype(np.int64))
    seen[-1] = flat.size  # exactly the whole stream despite rounding
    distinct = np.searchsorted(first_seen, seen)  # first sightings at positions < n
    return [int(n) for n in seen], [int(v) for v in distinct]


def heaps_fit(seen: Sequence[int], distinct: Sequence[int]) -> tuple[float, float]:
    """``(beta, k)`` of ``V(n) = k n^beta`` by least squares of ``log V = log k + beta log n`` over the
    curve's points; ``(nan, nan)`` with fewer than 2 points."""
    if len(seen) < 2:
        return float("nan"), float("nan")
    x, y = np.log(np.asarray(seen, dtype=np.float64)), np.log(np.asarray(distinct, dtype=np.float64))
    xc, yc = x - x.mean(), y - y.mean()
    beta = float((xc * yc).sum() / (xc * xc).sum())
    return beta, float(math.exp(y.mean() - beta * x.mean()))


def raw_bits_per_token(codebook_size: int) -> int:
    """``ceil(log2 V)`` (at least 1): the bits of a fixed-width code for one of ``V`` codes."""
    return max(1, (int(codebook_size) - 1).bit_length())


def serialize(stream: Tokens, codebook_size: int) -> bytes:
    """The stream (read flat) as unsigned little-endian integers of the fewest whole bytes holding
    ``V - 1``: ``ceil(ceil(log2 V) / 8)`` bytes a token (1 for 256 codes, 2 for 2^16, 3 for 2^18)."""
    width = (raw_bits_per_token(codebook_size) + 7) // 8
    as_bytes = _array(stream).ravel().astype("<u8").view(np.uint8).reshape(-1, 8)
    return np.ascontiguousarray(as_bytes[:, :width]).tobytes()


def compression(stream: Tokens, codebook_size: int) -> dict[str, float]:
    """Bits per token of the :func:`serialize`-d stream compressed by zlib (level 9, with its 6 bytes of
    header and checksum) and by lzma (raw LZMA2, preset 6): ``compressed bytes * 8 / tokens``, and the
    ratios ``raw bits / compressed bits``, raw = :func:`raw_bits_per_token` bits a token."""
    stream = _array(stream)
    tokens = stream.size
    data = serialize(stream, codebook_size)
    raw = raw_bits_per_token(codebook_size)
    zlib_bits = len(zlib.compress(data, 9)) * 8 / tokens
    lzma_bits = len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)) * 8 / tokens
    return {"raw_bits_per_token": float(raw), "serialized_bytes_per_token": float(len(data) // tokens),
            "zlib_bits_per_token": zlib_bits, "lzma_bits_per_token": lzma_bits,
            "zlib_ratio": raw / zlib_bits, "lzma_ratio": raw / lzma_bits}


def token_language_statistics(tokens: Tokens, codebook_size: int, *, max_distance: int = DEFAULT_MAX_DISTANCE,
                              heaps_points: int = DEFAULT_HEAPS_POINTS, held_out: Tokens | None = None,
                              alpha: float = 1.0) -> dict[str, Any]:
    """Every statistic of this module for one sub-codebook's tokens ``[N, h, w]`` (grid) or ``[N, L]``
    (sequence), as plain Python numbers and lists (JSON-ready):

    ``layout`` ("grid" / "sequence"), ``images``, ``tokens``; ``unigram_entropy_bits`` (``H(x)``, the
    bound of a memoryless code); ``conditional_entropy_left_bits``; for grids ``conditional_entropy_left_up_bits``
    and ``left_up_contexts`` (distinct (left, up) pairs seen); ``bigram_entropy_bits`` (``H(x_t | x_{t-1})``
    in raster order), ``bigram_contexts`` and ``bigram_perplexity``; ``split_half_bigram_perplexity``
    (:func:`held_out_bigram_perplexity` of the second half of the images under the add-``alpha`` model of
    the first half, ``N // 2`` images; NaN for one image: an out-of-sample check on the plug-in number);
    ``held_out_bigram_perplexity`` (``held_out`` scored under the model of all of ``tokens``) when
    ``held_out`` (same layout) is given; ``mutual_information_bits`` (list, distance 1 first);
    ``heaps_tokens``, ``heaps_distinct``, ``heaps_beta``, ``heaps_k``; and :func:`compression`'s keys.
    """
    tokens = _array(tokens)
    if tokens.ndim not in (2, 3) or tokens.size == 0:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: expected a non-empty [N, h, w] grid or "
                         "[N, L] sequences")
    grid = tokens.ndim == 3
    stream = _raster(tokens)
    out: dict[str, Any] = {"layout": "grid" if grid else "sequence", "images": int(tokens.shape[0]),
                           "tokens": int(tokens.size), "codebook_size": int(codebook_size),
                           "unigram_entropy_bits": entropy_bits(tokens),
                           "conditional_entropy_left_bits": conditional_entropy_left(tokens)}
    if grid:
        out["conditional_entropy_left_up_bits"] = conditional_entropy_left_up(tokens)
        out["left_up_contexts"] = (int(joint_ids(tokens[:, 1:, :-1], tokens[:, :-1, 1:]).max()) + 1
                                   if min(tokens.shape[1:]) > 1 else 0)
    out["bigram_entropy_bits"] = conditional_entropy_left(stream)
    out["bigram_contexts"] = int(np.unique(stream[:, :-1]).size)
    out["bigram_perplexity"] = 2.0 ** out["bigram_entropy_bits"]
    half = tokens.shape[0] // 2
    out["split_half_bigram_perplexity"] = (
        held_out_bigram_perplexity(tokens[:half], tokens[half:], codebook_size, alpha) if half else float("nan"))
    if held_out is not None:
        out["held_out_bigram_perplexity"] = held_out_bigram_perplexity(tokens, held_out, codebook_size, alpha)
    out["mutual_information_bits"] = mutual_information(tokens, max_distance)
    seen, distinct = heaps_curve(stream, heaps_points)
    out["heaps_tokens"], out["heaps_distinct"] = seen, distinct
    out["heaps_beta"], out["heaps_k"] = heaps_fit(seen, distinct)
    out.update(compression(stream, codebook_size))
    return out


def language_statistics(indices: Tokens, codebook_sizes: Sequence[int], **options: Any) -> list[dict[str, Any]]:
    """:func:`token_language_statistics` of each sub-codebook ``k`` of a quantizer's indices: a grid
    ``[N, h, w, K]`` or sequences ``[N, L, K]`` (told apart by the number of dimensions), sub-token ``k``
    in ``[0, codebook_sizes[k])``. ``options``: ``max_distance``, ``heaps_points``, ``held_out``
    (indices of the same layout; a held-out bigram perplexity) and ``alpha``."""
    indices = _array(indices)
    if indices.ndim not in (3, 4) or indices.shape[-1] != len(codebook_sizes):
        raise ValueError(f"indices of shape {tuple(indices.shape)}: expected [N, h, w, K] or [N, L, K] with "
                         f"K = {len(codebook_sizes)} sub-codebooks")
    held_out = options.pop("held_out", None)
    return [token_language_statistics(indices[..., k], size, **options,
                                      held_out=None if held_out is None else _array(held_out)[..., k])
            for k, size in enumerate(codebook_sizes)]


def shard_language_statistics(directory: str | Path, max_images: int | None = DEFAULT_MAX_IMAGES,
                              **options: Any) -> list[dict[str, Any]]:
    """:func:`language_statistics` of a token shard directory (``tokenize_dataset``'s output, read by
    :class:`~imagetok.data.token_shards.TokenShards`): its first ``max_images`` images (None: all of
    them, loaded at once as int64), with the codebook sizes of its ``index.json``."""
    from imagetok.data.token_shards import TokenShards

    shards = TokenShards(directory)
    if max_images is None or max_images >= len(shards):
        indices = shards.all()
    else:
        indices = torch.stack([shards[i] for i in range(max_images)])
    return language_statistics(indices, shards.index["codebook_sizes"], **options)


def token_language_rows(k: int, s: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows of sub-codebook ``k``'s token-language statistics ``s`` (in-sample plug-in estimates,
    low for conditional entropies and high for MI when the contexts seen approach the tokens counted)."""
    context = (f"H(x given left, up) {s['conditional_entropy_left_up_bits']:.3f} ({s['left_up_contexts']} contexts), "
               if s["layout"] == "grid" else "")
    mi = f"{s['mutual_information_bits'][0]:.4f}" if s["mutual_information_bits"] else "n/a"
    return [(f"sub-codebook {k} predictability ({s['images']} images, {s['tokens']} tokens, in-sample)",
             f"{context}H(x given left) {s['conditional_entropy_left_bits']:.3f} bits, "
             f"bigram perplexity {s['bigram_perplexity']:.1f} (held-out half {s['split_half_bigram_perplexity']:.1f}), "
             f"MI at distance 1 {mi} bits, "
             f"Heaps beta {s['heaps_beta']:.3f}"),
            (f"sub-codebook {k} compression (bits/token)",
             f"zlib {s['zlib_bits_per_token']:.3f}, lzma {s['lzma_bits_per_token']:.3f} vs unigram entropy "
             f"{s['unigram_entropy_bits']:.3f}, bigram {s['bigram_entropy_bits']:.3f}, "
             f"raw {s['raw_bits_per_token']:.0f}")]
