"""What a probe run leaves for a person: the loss curve (PNG) and ``summary.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from imagetok.evaluation.token_language import token_language_rows


def plot_loss_curve(curve: dict[str, list[list[float]]], unigram_nats: float | None, path: str | Path) -> None:
    """Training and validation NLL (nats per position) against the step, with the unigram entropy of
    the training tokens (converted to nats) as a dashed line: the level a model without context reaches."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, style in (("train", dict(color="tab:blue", linewidth=1)), ("val", dict(color="tab:orange", marker="o"))):
        rows = curve.get(name) or []
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], label=f"{name} NLL", **style)
    if unigram_nats is not None:
        ax.axhline(unigram_nats, color="gray", linestyle="--", linewidth=0.8, label="unigram entropy (train tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats per position)")
    ax.set_title("AR probe: next-token NLL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def write_summary(metrics: dict[str, Any], path: str | Path) -> None:
    """``summary.md``: what was probed, and the held-out figures as a Markdown table."""
    final = metrics["final"]
    rows = [("validation NLL, nats per position", final["nll_nats_per_position"]),
            ("validation bits per position (summed over K sub-tokens)", final["bits_per_position"]),
            ("validation bits per sub-token", final["bits_per_subtoken"]),
            ("bits per image", final["bits_per_image"]), ("bits per pixel", final["bits_per_pixel"]),
            ("unigram entropy of training tokens, bits per position", final["unigram_entropy_bits_per_position"]),
            ("gap: unigram - validation, bits per position (> 0: structure found)", final["gap_bits_per_position"]),
            ("gap, bits per sub-token", final["gap_bits_per_subtoken"]),
            ("gFID", (metrics.get("gfid") or {}).get("gfid"))]
    for k, stats in enumerate(metrics.get("token_language", [])):  # of the training tokens, in-sample
        rows.extend(token_language_rows(k, stats))
    lines = ["# AR probe", "",
             f"Tokens: `{metrics['tokens']}` (validation `{metrics['val_tokens']}`), tokenizer sha256 "
             f"`{metrics['tokenizer_sha256'][:16]}`; layout {metrics['layout_description']}; "
             f"sub-tokens {metrics['subtokens']}; {metrics['conditioning']}.",
             f"Model: {metrics['parameters'] / 1e6:.2f}M parameters, {metrics['steps']} steps, "
             f"{metrics['train_seconds']} s; validated on {metrics['val_images']} images.", "",
             "| metric | value |", "|---|---|"] + [f"| {name} | {_fmt(value)} |" for name, value in rows]
    if metrics.get("gfid") is None:
        lines += ["", f"gFID: not computed ({metrics.get('gfid_skipped', 'fid.enabled=false')})."]
    else:
        g = metrics["gfid"]
        lines += ["", f"gFID: {g['num_samples']} samples against {g['num_reference']} source images, Inception "
                  f"{g['inception']}, layer {g['feature_layer']}."]
    lines += ["", f"Samples: `{metrics['samples']['grid']}` (temperature {metrics['samples']['temperature']}, "
              f"top-k {metrics['samples']['top_k'] or 'off'}). Loss curve: `{metrics['loss_curve']}`.",
              "", "Bits per position: NLL summed over the K sub-tokens of one position; per sub-token: divided by K. "
              "Bits per pixel: bits per image / (H x W) of the source images. The probe follows GigaTok's AR "
              "probing (Xiong et al. 2025, arXiv 2504.08736).", ""]
    Path(path).write_text("\n".join(lines))
