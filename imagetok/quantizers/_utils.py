"""Helpers shared by quantizer families: layout changes, float32 math, chunked nearest-code search,
k-means and codebook statistics."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from einops import rearrange

from imagetok.errors import ConfigValueError


def to_tokens(z: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Flatten latents to ``[T, C]`` tokens and return a function restoring ``[T, C']`` to the
    input layout. 4D+ inputs are ``[B, C, *spatial]``; 3D inputs are ``[B, N, C]`` sequences."""
    if z.ndim == 3:  # [B, N, C]: already channels last
        b, n, _ = z.shape
        return z.reshape(b * n, -1), lambda t: t.reshape(b, n, -1)
    spatial = z.shape[2:]
    tokens = rearrange(z, "b c ... -> b ... c").reshape(-1, z.shape[1])  # [B, C, *S] -> [B*prod(S), C]
    b = z.shape[0]

    def restore(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t.reshape(b, *spatial, -1), "b ... c -> b c ...")

    return tokens, restore


def index_shape(z: torch.Tensor) -> tuple[int, ...]:
    """Shape of the index grid for latents ``z``: ``(B, *spatial)`` or ``(B, N)``."""
    return tuple(z.shape[:2]) if z.ndim == 3 else (z.shape[0], *z.shape[2:])


def check_index_range(indices: torch.Tensor, sizes: int | Sequence[int]) -> None:
    """Raise :class:`ConfigValueError` (key ``indices``) unless every index lies in ``[0, size)``.

    ``indices``: integer tensor ``[..., K]``; ``sizes``: one vocabulary size for every entry, or one per
    sub-token (``K`` of them, as ``codebook_sizes``). One host sync; the message is built only on
    failure. An exported program (serving) cannot raise a data-dependent Python error, so while
    exporting nothing is checked and out-of-range indices are the caller's to avoid.
    """
    if torch.compiler.is_exporting():
        return
    if not isinstance(sizes, int):
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) == 1:
            sizes = sizes[0]
    bound = sizes if isinstance(sizes, int) else torch.tensor(sizes, dtype=torch.long, device=indices.device)
    if bool(((indices >= 0) & (indices < bound)).all()):
        return
    if isinstance(sizes, int):
        raise ConfigValueError("indices", f"range [{int(indices.min())}, {int(indices.max())}]",
                               f"integers in [0, {sizes})")
    flat = indices.reshape(-1, len(sizes))
    k = next(k for k, size in enumerate(sizes) if not bool(((flat[:, k] >= 0) & (flat[:, k] < size)).all()))
    raise ConfigValueError("indices", f"sub-token {k} in range [{int(flat[:, k].min())}, {int(flat[:, k].max())}]",
                           f"integers in [0, size) per sub-token, sizes {sizes}")


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype quantizer math runs in: float64 when every given tensor (input, codebook) already is,
    float32 otherwise. A model cast with ``.double()`` thus stays float64 end to end (converters are
    checked against the original implementation that way); half and bfloat16 are never used."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def float32_math(device: torch.device) -> Iterator[None]:
    """Disable autocast so distances, rounding and indices are computed in float32; under
    ``bf16-mixed`` a bf16 distance would flip near-ties and change the chosen codes."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def nearest_code(
    tokens: torch.Tensor, codebook: torch.Tensor, max_elements: int = 2**20, cosine: bool = False, min_rows: int = 16
) -> torch.Tensor:
    """Index of the nearest code for each token.

    tokens ``[T, D]``, codebook ``[K, D]`` (float32) -> LongTensor ``[T]``. The ``T x K`` distance
    matrix is built a block of rows at a time, ``max(min_rows, max_elements // K)`` rows, so memory is
    bounded by the codebook, never by the number of tokens (codebooks of 2^16 codes and more). Blocks
    of about 2^20 distances stay in cache, which makes this faster than the full matrix as well
    (``benchmarks/vq_search.py``). With ``cosine`` both sides must already be l2-normalised and the
    largest dot product wins.
    """
    rows = max(min_rows, max_elements // max(1, codebook.shape[0]))
    codes_t = codebook.t()
    code_sq = None if cosine else codebook.pow(2).sum(1)  # [K]
    out = torch.empty(tokens.shape[0], dtype=torch.long, device=tokens.device)
    for start in range(0, tokens.shape[0], rows):
        t = tokens[start : start + rows]
        if cosine:
            out[start : start + rows] = (t @ codes_t).argmax(1)
        else:
            # ||t||^2 - 2 t.e + ||e||^2 without the per-row constant ||t||^2, in one fused op
            out[start : start + rows] = torch.addmm(code_sq, t, codes_t, alpha=-2.0).argmin(1)
    return out


def kmeans(samples: torch.Tensor, num_clusters: int, iters: int, cosine: bool = False,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``samples`` ``[T, D]`` (float32). Returns centroids ``[K, D]`` and the
    cluster sizes ``[K]`` of the last assignment. Centroids start from random samples (drawn with
    replacement when there are fewer samples than clusters); an empty cluster keeps its centroid."""
    t = samples.shape[0]
    pick = (torch.randperm(t, generator=generator, device="cpu")[:num_clusters] if t >= num_clusters
            else torch.randint(0, t, (num_clusters,), generator=generator, device="cpu"))
    centroids = samples[pick.to(samples.device)].clone()
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in range(max(1, iters)):
        assign = nearest_code(samples, centroids, cosine=cosine)
        counts = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        filled = counts > 0
        new = sums[filled] / counts[filled, None]
        centroids[filled] = torch.nn.functional.normalize(new, dim=-1) if cosine else new
    return centroids, counts


def code_counts(indices: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of ``size`` codes occurs in ``indices`` ``[T]`` (int64): ``[size]`` int64. The
    same as ``torch.bincount(indices, minlength=size)`` for indices below ``size``, without its host
    sync on CUDA (bincount reads the maximum index to size its output)."""
    indices = indices.long()
    return torch.zeros(size, dtype=torch.long, device=indices.device).scatter_add_(0, indices, torch.ones_like(indices))


def is_initialized(quantizer: torch.nn.Module) -> bool:
    """``quantizer.initialized`` (a bool buffer that training only ever turns true), read from the
    device until it is true and then remembered, so that a step of a trained quantizer does not wait for
    the GPU. Loading a state dict forgets it (:func:`forget_initialized`, a load hook)."""
    if not getattr(quantizer, "_initialized_seen", False):
        quantizer._initialized_seen = bool(quantizer.initialized)
    return quantizer._initialized_seen


def forget_initialized(quantizer: torch.nn.Module, incompatible_keys=None) -> None:
    quantizer._initialized_seen = False  # the loaded buffer decides again


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by ``counts`` ``[K]``; K when uniform, 1 when collapsed."""
    probs = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())


def count_statistics(indices: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Usage (distinct codes / size), perplexity and entropy (bits) of one sub-token's ``[T]`` indices."""
    total = max(1, indices.numel())
    if size <= indices.numel():  # a dense histogram, no host sync
        probs = code_counts(indices, size).float() / total
        usage = (probs > 0).float().sum() / size
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    else:  # larger codebooks: count the batch's codes only (every count > 0), fewer and smaller ops
        probs = torch.unique(indices, return_counts=True)[1].float() / total
        usage = probs.new_tensor(probs.numel() / size)
        entropy = -(probs * probs.log()).sum()
    return {"batch_usage": usage, "perplexity": entropy.exp(), "entropy_bits": entropy / math.log(2)}


def world_size() -> int:
    """Number of ranks in the default process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (no-op without an initialised process group): the one
    place where per-rank codebook statistics become global ones."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy, so randomised decisions (k-means seeds,
    which samples revive dead codes) are identical on every rank."""
    if world_size() > 1:
        torch.distributed.broadcast(tensor, src=0)
    return tensor
