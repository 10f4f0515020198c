"""Post-training quantization of a continuous tokenizer (TokenBridge): fit per-channel bins to the
latents of real images and write the fitted tokenizer.

    python -m imagetok.fit_quantizer checkpoint=<run>/checkpoints/last.ckpt out=<dir> \\
        [data=...] [num_images=N] [method=gaussian|empirical] [num_bins=K] [weights=ema|raw]

``checkpoint`` is a training checkpoint (EMA weights by default) or a ``save_pretrained`` directory of a
``quantizer=dimwise`` tokenizer (re-fitting with another ``num_bins`` or method). The encoder runs over
``num_images`` images of the data config's train split (``data=webdataset``: the first ``num_images``
of its training stream, which has no end, so ``num_images`` must be a number); ``method=gaussian``
takes equal-probability bins of a normal with each channel's mean and std (exact float64 sums over
every latent), ``method=empirical`` takes each channel's quantiles of a random subsample of ``max_samples`` latents.
Into ``out`` it writes a ``save_pretrained`` directory (``config.json``, ``model.safetensors``, model
card) plus ``quantizer_fit.json`` (method, edges, values and per-channel statistics) and
``latent_histograms.png``. Every file is written under a temporary name and renamed, the tokenizer
last, so an interrupted fit never leaves a half-written file (re-running it is safe).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from imagetok.data.inference import InferenceImages, is_stream
from imagetok.errors import ConfigValueError, check, exit_on_user_error
from imagetok.export.checkpoint import read_checkpoint
from imagetok.quantizers.dimwise import DimensionWiseQuantizer, empirical_bins, gaussian_bins
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)
QUANTILE_LIMIT = 2**24  # torch.quantile refuses larger inputs
FIT_NAME, PLOT_NAME = "quantizer_fit.json", "latent_histograms.png"


def load_continuous_tokenizer(checkpoint: str, weights: str, num_bins: int | None) -> Tokenizer:
    """The tokenizer to fit, in eval mode, rebuilt with ``num_bins`` bins when that differs from its config."""
    from imagetok.evaluation.run import load_tokenizer

    tokenizer = load_tokenizer(str(checkpoint), weights)
    if not isinstance(tokenizer.quantizer, DimensionWiseQuantizer):
        raise ConfigValueError("checkpoint", str(checkpoint), "a tokenizer trained with quantizer=dimwise (e.g. "
                               f"experiment=cpu_tokenbridge), not {type(tokenizer.quantizer).__name__}")
    if num_bins is None or num_bins == tokenizer.quantizer.num_bins:
        return tokenizer
    check(isinstance(num_bins, int) and num_bins >= 2, "num_bins", num_bins, "null (the config's) or an integer >= 2")
    config = copy.deepcopy(tokenizer.config)
    config["quantizer"]["num_bins"] = num_bins
    rebuilt = Tokenizer.from_config(config)
    # the bins are derived state, refitted below; every learned weight is carried over
    state = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("quantizer.")}
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("quantizer.") for k in missing), (missing, unexpected)
    return rebuilt.eval()


@torch.no_grad()
def gather_latents(tokenizer: Tokenizer, loader: Iterable[torch.Tensor], num_images: int, max_samples: int,
                   seed: int) -> dict[str, Any]:
    """Posterior means of every latent position of the first ``num_images`` images of ``loader`` (batches
    ``[B, 3, H, W]``; fewer if it ends first): exact float64 per-channel count / sum / sum of squares /
    min / max, and a uniform random subsample ``samples`` ``[N <= max_samples, C]``."""
    quantizer = tokenizer.quantizer
    device = next(tokenizer.parameters()).device
    channels = quantizer.out_dim
    total, sums, squares = 0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    low, high = torch.full((channels,), math.inf, dtype=torch.float64), torch.full((channels,), -math.inf, dtype=torch.float64)
    kept, keep_prob, seen = [], None, 0
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=num_images, unit="img", desc="fit: encode") as bar:
        for images in loader:
            images = images[: num_images - seen].to(device)
            mean, _, _ = quantizer.split(tokenizer.quant_conv(tokenizer.encoder(images)))  # [T, C] float32
            mean = mean.double().cpu()
            if keep_prob is None:  # positions per image are fixed: keep about max_samples overall (x1.1, trimmed below)
                keep_prob = min(1.0, 1.1 * max_samples / (num_images * mean.shape[0] / images.shape[0]))
            total += mean.shape[0]
            sums += mean.sum(0)
            squares += mean.pow(2).sum(0)
            low, high = torch.minimum(low, mean.min(0).values), torch.maximum(high, mean.max(0).values)
            kept.append(mean[torch.rand(mean.shape[0], generator=generator) < keep_prob].float())
            seen += images.shape[0]
            bar.update(images.shape[0])
            if seen >= num_images:
                break
    if seen == 0:
        raise ValueError("the data config's train split gave no image to fit the bins on")
    samples = torch.cat(kept)
    if samples.shape[0] > max_samples:
        samples = samples[torch.randperm(samples.shape[0], generator=generator)[:max_samples]]
    average = sums / total
    std = (squares / total - average.pow(2)).clamp_min(0).mul(total / max(1, total - 1)).sqrt()
    return {"images": seen, "latents": total, "mean": average, "std": std, "min": low, "max": high, "samples": samples}


def channel_report(quantizer: DimensionWiseQuantizer, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per channel: the data's statistics, the bins, and what the bins do to the subsample (usage,
    perplexity, entropy in bits, mean squared quantization error and signal-to-quantization-noise ratio)."""
    samples = stats["samples"]
    idx = quantizer.bucketize(samples.to(quantizer.edges.device)).cpu()
    error = (quantizer.lookup(idx.to(quantizer.edges.device)).cpu() - samples).pow(2).mean(0)
    out = []
    for c in range(quantizer.out_dim):
        counts = torch.bincount(idx[:, c], minlength=quantizer.num_bins).double()
        probs = counts / counts.sum().clamp_min(1)
        entropy = float(-(probs * torch.log2(probs.clamp_min(1e-300))).sum())
        variance = float(samples[:, c].var()) if samples.shape[0] > 1 else 0.0
        out.append({"channel": c, "mean": float(stats["mean"][c]), "std": float(stats["std"][c]),
                    "min": float(stats["min"][c]), "max": float(stats["max"][c]),
                    "usage": float((counts > 0).double().mean()), "perplexity": 2**entropy, "entropy_bits": entropy,
                    "quantization_mse": float(error[c]),
                    "sqnr_db": 10 * math.log10(variance / float(error[c])) if error[c] > 0 and variance > 0 else None,
                    "edges": quantizer.edges[c].tolist(), "values": quantizer.values[c].tolist()})
    return out


def plot_histograms(samples: torch.Tensor, quantizer: DimensionWiseQuantizer, path: Path, method: str) -> None:
    """One panel per channel: histogram (density) of the latent subsample, the fitted bin edges as
    vertical lines, and, for ``gaussian``, the fitted normal density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels = quantizer.out_dim
    cols = min(4, channels)
    rows = -(-channels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= channels:
            ax.axis("off")
            continue
        x = samples[:, c].double()
        ax.hist(x.numpy(), bins=100, density=True, color="tab:blue", alpha=0.7)
        for edge in quantizer.edges[c].cpu().tolist():
            ax.axvline(edge, color="tab:red", linewidth=0.4, alpha=0.6)
        if method == "gaussian":
            mu, sigma = float(x.mean()), float(x.std())
            grid = torch.linspace(float(x.min()), float(x.max()), 200, dtype=torch.float64)
            pdf = torch.exp(-0.5 * ((grid - mu) / sigma).pow(2)) / (sigma * math.sqrt(2 * math.pi))
            ax.plot(grid.numpy(), pdf.numpy(), color="black", linewidth=1)
        ax.set_title(f"channel {c}: {quantizer.num_bins} bins", fontsize=9)
    fig.suptitle(f"posterior means per channel ({samples.shape[0]} samples) and {method} bin edges", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def fit(cfg: DictConfig) -> Path:
    """Fit the bins as ``cfg`` says and write the fitted tokenizer and its report under ``cfg.out``."""
    from imagetok.export.model_card import model_card
    from imagetok.training.callbacks import write_json_atomic
    from imagetok.training.run import instantiate_part

    check(cfg.method in ("gaussian", "empirical"), "method", cfg.method, "'gaussian' or 'empirical'")
    check(cfg.weights in ("ema", "raw"), "weights", cfg.weights, "'ema' or 'raw'")
    check(cfg.num_images is None or (isinstance(cfg.num_images, int) and cfg.num_images >= 1), "num_images",
          cfg.num_images, "null (the whole train split) or an integer >= 1")
    check(isinstance(cfg.max_samples, int) and cfg.max_samples >= 2, "max_samples", cfg.max_samples, "an integer >= 2")
    check(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "batch_size", cfg.batch_size, "an integer >= 1")
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise ConfigValueError("checkpoint", cfg.checkpoint, "an existing training .ckpt or save_pretrained directory")
    torch.manual_seed(cfg.seed)
    tokenizer = load_continuous_tokenizer(cfg.checkpoint, cfg.weights, cfg.num_bins)
    quantizer = tokenizer.quantizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer.to(device)
    datamodule = instantiate_part(cfg.data, "data")
    dataset = datamodule.train_dataset()
    if is_stream(dataset):  # webdataset: the training stream is endless (resampled or repeated shards)
        check(cfg.num_images is not None, "num_images", cfg.num_images, "an integer >= 1 with data=webdataset "
              "(its training stream has no end, so the number of images to fit on must be given)")
    loader = InferenceImages(dataset, batch_size=cfg.batch_size, num_workers=datamodule.num_workers,
                             num_images=cfg.num_images)
    total = loader.total  # a stream's images are counted as they come; it may end before num_images
    max_samples = min(cfg.max_samples, QUANTILE_LIMIT // quantizer.out_dim)
    stats = gather_latents(tokenizer, loader, total, max_samples, cfg.seed)
    if cfg.method == "gaussian":
        edges, values = gaussian_bins(stats["mean"], stats["std"].clamp_min(1e-8), quantizer.num_bins)
    else:
        edges, values = empirical_bins(stats["samples"], quantizer.num_bins)
    quantizer.set_bins(edges.to(device), values.to(device))
    tokenizer.cpu()

    channels = channel_report(quantizer, stats)
    saved = read_checkpoint(path) if path.is_file() else {}
    run_config = (saved.get("hyper_parameters") or {}).get("config") or {}
    summary = {"method": cfg.method, "num_bins": quantizer.num_bins, "channels": quantizer.out_dim,
               "checkpoint": str(path), "weights": cfg.weights if path.is_file() else "as saved",
               "num_images": stats["images"], "num_latents": stats["latents"], "samples": int(stats["samples"].shape[0]),
               "data": OmegaConf.to_container(cfg.data, resolve=True),
               "mean_entropy_bits": sum(c["entropy_bits"] for c in channels) / len(channels),
               "mean_quantization_mse": sum(c["quantization_mse"] for c in channels) / len(channels),
               "per_channel": channels}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_histograms(stats["samples"], quantizer, out / PLOT_NAME, cfg.method)
    write_json_atomic(out / FIT_NAME, summary)
    card = model_card(tokenizer, run_config, saved.get("global_step"), None, summary["weights"], str(path))
    card += (f"\n## Post-training quantization\n\n{cfg.method} bins, {quantizer.num_bins} per channel, fitted on "
             f"{stats['images']} images ({stats['latents']} latent positions); mean entropy "
             f"{summary['mean_entropy_bits']:.2f} bits per channel. Details: `{FIT_NAME}`, `{PLOT_NAME}`.\n")
    extra = {"quantizer_fit": {k: summary[k] for k in ("method", "num_bins", "num_images", "num_latents")},
             "training_steps": saved.get("global_step"), "image_size": run_config.get("data", {}).get("image_size")}
    tokenizer.save_pretrained(out, extra=extra, card=card)  # staged in a temporary directory, then renamed
    log.info("fitted %s bins (%d per channel, %d channels) on %d images; mean entropy %.2f bits/channel, "
             "quantization MSE %.3g; wrote %s", cfg.method, quantizer.num_bins, quantizer.out_dim, stats["images"],
             summary["mean_entropy_bits"], summary["mean_quantization_mse"], out)
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="fit_quantizer")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        fit(cfg)


if __name__ == "__main__":
    main()
