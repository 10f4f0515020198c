"""PNG plots of token statistics: usage histogram per sub-codebook and the rank-frequency (Zipf) curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from imagetok.evaluation.codebook import CodeCounts

MAX_BARS = 2048  # a larger codebook is drawn as counts per range of code indices


def plot_usage_histograms(per_codebook: list[CodeCounts], path: str | Path) -> None:
    """One panel per sub-codebook: how often each code index was used, or, above ``MAX_BARS`` codes,
    how many tokens fell in each of ``MAX_BARS`` equal ranges of code indices."""
    n = len(per_codebook)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.4 * n), squeeze=False)
    for k, (ax, c) in enumerate(zip(axes[:, 0], per_codebook)):
        size, used = c.codebook_size, int(c.codes.numel())
        bars = min(size, MAX_BARS)
        # float64 bin edges: code indices up to 2^62 stay ordered, and the counts are exact integers
        heights, edges = np.histogram(c.codes.cpu().double().numpy(), bins=bars, range=(0, size),
                                      weights=c.counts.cpu().double().numpy())
        ax.bar(edges[:-1], heights, width=size / bars, align="edge", color="tab:blue")
        ax.set_title(f"sub-codebook {k}: {used}/{size} codes used ({100 * used / size:.3g}%)")
        ax.set_xlabel("code index" if bars == size else f"code index (bins of {size / bars:.3g} codes)")
        ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rank_frequency(per_codebook: list[CodeCounts], exponents: list[float], path: str | Path) -> None:
    """Log-log rank-frequency curve of each sub-codebook's used codes, with the fitted Zipf exponent."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k, (c, s) in enumerate(zip(per_codebook, exponents)):
        freq = c.counts[c.counts > 0].double().sort(descending=True).values.cpu()
        if freq.numel():
            ax.loglog(range(1, freq.numel() + 1), (freq / freq.sum()).numpy(), label=f"sub-codebook {k} (s={s:.2f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("frequency")
    ax.set_title("token rank-frequency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_psnr_vs_tokens(psnr_by_count: dict[str, float], full_psnr: float | None, path: str | Path,
                        kind: str = "tokens") -> None:
    """Held-out PSNR against the sub-tokens a prefix keeps per image (``{"count": dB}``), log2 axis;
    ``kind``: what the prefixes cut (``tokens``, residual ``depth`` or ``scales``), for the axis label."""
    counts = sorted(int(k) for k in psnr_by_count)
    values = [psnr_by_count[str(k)] for k in counts]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(counts, values, marker="o", color="tab:blue")
    for k, v in zip(counts, values):
        ax.annotate(f"{v:.2f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if full_psnr is not None:
        ax.axhline(full_psnr, color="gray", linestyle="--", linewidth=0.8, label=f"all tokens ({full_psnr:.2f} dB)")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(k) for k in counts])
    ax.set_xlabel({"tokens": "tokens decoded (first k of the sequence)",
                   "depth": "tokens decoded (positions x residual levels kept)",
                   "scales": "tokens decoded (first scales of the coarse-to-fine sequence)"}[kind])
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("reconstruction quality against number of tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
