"""Fréchet distance between Gaussian fits of feature sets (FID, Heusel et al. 2017,
https://arxiv.org/abs/1706.08500), in float64 through symmetric eigendecompositions.

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

``tr((S1 S2)^(1/2))`` equals the sum of square roots of the eigenvalues of ``L^T S2 L`` (``S1 = L L^T``),
which is symmetric positive semi-definite: a Cholesky factorisation and one eigenvalues-only symmetric
solve replace scipy's ``sqrtm`` (a Schur decomposition in complex arithmetic), leave no complex parts
to discard, and clamping the tiny negative eigenvalues that rounding leaves makes the result never
negative. ``benchmarks/fid.py`` times both routes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from imagetok.quantizers._utils import all_reduce_sum


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2))`` for symmetric PSD float64 matrices: the sum of square roots of the
    eigenvalues of a symmetric PSD matrix similar to ``S1 S2``. With the Cholesky factor ``S1 = L L^T``
    that matrix is ``L^T S2 L``; a singular ``S1`` (fewer images than dimensions) takes its symmetric
    square root instead. Eigenvalues only, symmetric solver: no complex numbers, negatives from
    rounding clamped to 0."""
    try:
        factor = scipy.linalg.cholesky(sigma1, lower=True, check_finite=False)
        similar = factor.T @ sigma2 @ factor
    except np.linalg.LinAlgError:
        values, vectors = scipy.linalg.eigh(sigma1, check_finite=False)
        root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        similar = root @ sigma2 @ root
    eigenvalues = scipy.linalg.eigh((similar + similar.T) / 2, eigvals_only=True, check_finite=False)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2); ``mu`` ``[D]``, ``sigma`` ``[D, D]``
    (numpy arrays or tensors, any float dtype; computed in float64). Returns a float >= 0."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a.detach().cpu() if torch.is_tensor(a) else a, dtype=np.float64)
                                for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    # symmetrise: a covariance read from a file may carry asymmetric rounding
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    value = (np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2)
             - 2 * _trace_sqrt_product(sigma1, sigma2))
    return max(float(value), 0.0)


class FeatureStatistics:
    """Running float64 mean and covariance of features ``[N, D]``, summable across ranks.

    The sums (count, sum, sum of outer products) are exact to float64 and order-independent up to
    rounding, so features never need to be kept or gathered: ``sync()`` all-reduces three tensors.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu().reshape(features.shape[0], -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"expected features of dimension {self.dim}, got {tuple(features.shape)}")
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def sync(self) -> None:
        """Sum over ranks (every rank must call it; no-op without a process group)."""
        for t in (self.count, self.total, self.outer):
            all_reduce_sum(t)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """``mu`` ``[D]`` and the unbiased covariance ``[D, D]`` (ddof=1, as numpy.cov), float64."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"FID needs at least 2 images, got {int(n)}")
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **protocol: object) -> None:
    """Write ``mu``/``sigma`` as ``.npz`` (the format of the public ImageNet reference batches),
    with the protocol that produced them stored beside as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {f"protocol_{k}": np.asarray(str(v)) for k, v in protocol.items()}
    with open(path, "wb") as handle:  # np.savez would append .npz to a name without it
        np.savez(handle, mu=mu, sigma=sigma, **extra)


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` ``[D]`` and ``sigma`` ``[D, D]`` from an ``.npz`` reference file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.reference: no such file {path}")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"eval.reference: {path} has no 'mu' and 'sigma' arrays (has {sorted(data.files)})")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
