"""``evaluate(cfg, run_dir)``: reconstruct an evaluation split and write every metric with its protocol.

Per image the originals and reconstructions are rounded to uint8 first (as saved PNGs would hold
them, ``eval.round_to_uint8``), then: PSNR and SSIM (torchmetrics), LPIPS-VGG (``lpips``), Inception
features for FID (torch-fidelity's network), and exact token counts per sub-codebook.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import save_image
from tqdm import tqdm

from imagetok.data.inference import InferenceImages
from imagetok.errors import ConfigValueError, check
from imagetok.evaluation.codebook import CodebookUsage
from imagetok.evaluation.fid import FeatureStatistics, frechet_distance, load_reference, save_reference
from imagetok.evaluation.inception import InceptionFeatures
from imagetok.evaluation.plots import plot_psnr_vs_tokens, plot_rank_frequency, plot_usage_histograms
from imagetok.evaluation.tokens import token_statistics
from imagetok.quantizers._utils import all_reduce_sum
from imagetok.tokenizer import Tokenizer
from imagetok.training.callbacks import reconstruction_grid, write_json_atomic

log = logging.getLogger(__name__)
METRICS = ("psnr", "ssim", "lpips", "fid", "tokens")


def load_tokenizer(checkpoint: str, weights: str) -> Tokenizer:
    """A Lightning training checkpoint, or a ``save_pretrained`` directory (``config.json`` +
    ``model.safetensors``), in eval mode."""
    path = Path(checkpoint)
    if path.is_dir():
        if not hasattr(Tokenizer, "from_pretrained"):
            raise ConfigValueError("checkpoint", checkpoint, "a Lightning .ckpt file (this version cannot read "
                                   "save_pretrained directories)")
        return Tokenizer.from_pretrained(path).eval()
    if not path.is_file():
        raise ConfigValueError("checkpoint", checkpoint, "the path of an existing .ckpt file or save_pretrained directory")
    return Tokenizer.from_checkpoint(path, weights=weights)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("imagetok", "torch", "torchmetrics", "torch-fidelity", "lpips"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device. Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is started
    (NCCL on GPUs, gloo on CPUs) and each rank takes every ``world``-th image (of a stream: its own
    shards), so every image is counted exactly once; statistics are then summed over ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def validate_eval_config(e: DictConfig) -> None:
    check(e.weights in ("ema", "raw"), "eval.weights", e.weights, "'ema' or 'raw'")
    unknown = [m for m in e.metrics if m not in METRICS]
    check(not unknown, "eval.metrics", list(e.metrics), f"a list drawn from {list(METRICS)}")
    check(e.num_images is None or (isinstance(e.num_images, int) and e.num_images >= 2), "eval.num_images",
          e.num_images, "null (the whole split) or an integer >= 2")
    check(isinstance(e.batch_size, int) and e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    if e.save_reference is not None:
        check("fid" in e.metrics, "eval.save_reference", e.save_reference, "null unless 'fid' is in eval.metrics")


def prefix_lengths(tokenizer: Tokenizer, num_tokens: Any) -> list[int]:
    """Token counts ``k`` at which ``eval.num_tokens`` asks for the PSNR of ``decode(ids[:, :k])``: ``null``
    picks the powers of two below ``N`` and ``N`` for a variable-length 1D tokenizer (none otherwise),
    ``[]`` turns it off, a list is taken as given (each in ``1..N``, 1D tokenizers only), and a single
    integer ``k`` is the list ``[k]``."""
    if num_tokens is None:
        if not tokenizer.variable_length:
            return []
        n = tokenizer.encoder.num_latent_tokens
        return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
    if isinstance(num_tokens, int) and not isinstance(num_tokens, bool):
        num_tokens = [num_tokens]
    what = "null, [] or a list of token counts (e.g. [1, 4, 16]); a single integer k counts as [k]"
    check(isinstance(num_tokens, Sequence) and not isinstance(num_tokens, str), "eval.num_tokens", num_tokens, what)
    check(all(isinstance(k, int) and not isinstance(k, bool) for k in num_tokens), "eval.num_tokens",
          list(num_tokens), what)
    counts = [int(k) for k in num_tokens]
    if counts and not tokenizer.is_sequence:
        raise ConfigValueError("eval.num_tokens", counts, "null or [] for a tokenizer whose tokens form a grid "
                               "(prefixes of tokens decode only for 1D latent-token tokenizers)")
    n = tokenizer.encoder.num_latent_tokens if counts else 0
    check(all(1 <= k <= n for k in counts), "eval.num_tokens", counts, f"token counts in [1, {n}]")
    return sorted(set(counts))


def _to_unit(recon: torch.Tensor, round_to_uint8: bool) -> torch.Tensor:
    """Reconstruction in [-1, 1] -> [0, 1], rounded through uint8 when the protocol says so."""
    return Tokenizer.to_uint8(recon).float() / 255 if round_to_uint8 else (recon.clamp(-1, 1) + 1) / 2


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on the ``cfg.data`` validation split; writes ``metrics.json``,
    ``summary.md``, ``reconstructions.png``, ``codebook_usage.png`` and ``token_rank_frequency.png``
    under ``run_dir`` and returns the metrics dict."""
    from imagetok.training.run import instantiate_part  # the same config-error handling as training

    e = cfg.eval
    validate_eval_config(e)
    run_dir = Path(run_dir)
    rank, world, device = init_distributed()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.checkpoint, e.weights).to(device)
    data_cfg = cfg.data.copy()
    if e.num_images is not None and "val_samples" in data_cfg:  # the sample data draws as many crops as asked
        data_cfg.val_samples = e.num_images
    datamodule = instantiate_part(data_cfg, "data")
    # a webdataset stream gives each rank its own shards; an indexed split is divided by image index
    images_of_rank = InferenceImages(datamodule.val_dataset(), batch_size=e.batch_size, num_workers=datamodule.num_workers,
                                     num_images=e.num_images, rank=rank, world=world)
    total = images_of_rank.total  # over all ranks; for a stream at most this many, or None (unknown)

    wanted = set(e.metrics)
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device) if "psnr" in wanted else None
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device) if "ssim" in wanted else None
    lpips_net = None
    if "lpips" in wanted:
        from imagetok.losses.perceptual import LPIPS

        lpips_net = LPIPS(e.lpips_weights, random_backbone=e.random_weights, config_key="eval.lpips_weights").to(device)
    inception = None
    if "fid" in wanted:
        inception = InceptionFeatures(str(e.feature_layer), e.inception_weights, random_weights=e.random_weights).to(device)
        if total is not None and total < inception.dim and e.fid_reference == "originals" and not e.force:
            raise ConfigValueError("eval.num_images", total, f">= the feature dimension {inception.dim} for a "
                                   "full-rank covariance (or eval.force=true to compute a rank-deficient FID anyway)")
    stats_real = FeatureStatistics(inception.dim) if inception else None
    stats_fake = FeatureStatistics(inception.dim) if inception else None
    usage = CodebookUsage(tokenizer.codebook_sizes).to(device)
    prefixes = prefix_lengths(tokenizer, e.get("num_tokens"))
    prefix_psnr = {k: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device) for k in prefixes}
    lpips_sum, seen, grid = 0.0, 0, None

    with torch.no_grad(), tqdm(total=images_of_rank.expected, desc=f"evaluate (rank {rank}/{world})" if world > 1
                               else "evaluate", unit="img", disable=rank != 0) as bar:
        for images in images_of_rank:  # [B, 3, H, W] in [-1, 1]
            images = images.to(device)
            recon, quant = tokenizer(images)
            if e.round_to_uint8:
                real_u8, fake_u8 = Tokenizer.to_uint8(images), Tokenizer.to_uint8(recon)
            else:  # unrounded: uint8 only where a network demands it (Inception)
                real_u8, fake_u8 = None, None
            real = real_u8.float() / 255 if real_u8 is not None else (images.clamp(-1, 1) + 1) / 2
            fake = fake_u8.float() / 255 if fake_u8 is not None else (recon.clamp(-1, 1) + 1) / 2
            if psnr is not None:
                psnr.update(fake, real)
            if ssim is not None:
                ssim.update(fake, real)
            if lpips_net is not None:
                lpips_sum += float(lpips_net(real * 2 - 1, fake * 2 - 1)) * images.shape[0]
            if inception is not None:
                stats_real.update(inception(real_u8 if real_u8 is not None else Tokenizer.to_uint8(images)))
                stats_fake.update(inception(fake_u8 if fake_u8 is not None else Tokenizer.to_uint8(recon)))
            usage.update(quant.indices)
            for k, metric in prefix_psnr.items():  # the first k tokens alone, as a variable-length decoder takes them
                metric.update(_to_unit(tokenizer.decode(quant.indices[:, :k]), e.round_to_uint8), real)
            if grid is None:
                grid = reconstruction_grid(images[:8].cpu(), recon[:8].cpu())
            seen += images.shape[0]
            bar.update(images.shape[0])

    # every rank reaches these collectives; only the file writing below is rank 0's
    seen, lpips_sum = (float(all_reduce_sum(torch.tensor(v, dtype=torch.float64, device=device)))
                       for v in (float(seen), lpips_sum))
    seen = int(seen)
    with usage.sync_context():  # every rank's counts (a collective: every rank reaches it)
        per_codebook = [c.cpu() for c in usage.per_codebook()]
    if seen == 0:
        raise ConfigValueError("data", data_cfg._target_, "a validation split with at least one image")
    if inception is not None and seen < inception.dim and e.fid_reference == "originals" and not e.force:
        # a stream's length is known only now (the same check as above, on every rank alike)
        raise ConfigValueError("eval.num_images", e.num_images, f"a split of >= {inception.dim} images (the "
                               f"feature dimension, for a full-rank covariance): only {seen} were read (or "
                               "eval.force=true to compute a rank-deficient FID anyway)")
    results: dict[str, Any] = {"num_images": seen}
    if psnr is not None:
        results["psnr"] = float(psnr.compute())
    if ssim is not None:
        results["ssim"] = float(ssim.compute())
    if lpips_net is not None:
        results["lpips"] = lpips_sum / seen
    if inception is not None:
        for s in (stats_real, stats_fake):
            s.sync()
        mu_fake, sigma_fake = stats_fake.mean_and_covariance()
        if e.fid_reference == "originals":
            mu_ref, sigma_ref = stats_real.mean_and_covariance()
            reference = f"the {seen} original images of the evaluation split"
        else:
            mu_ref, sigma_ref = load_reference(e.fid_reference)
            reference = f"statistics file {e.fid_reference}"
        results["fid"] = frechet_distance(mu_ref, sigma_ref, mu_fake, sigma_fake)
        if e.save_reference and rank == 0:
            mu_real, sigma_real = stats_real.mean_and_covariance()
            save_reference(e.save_reference, mu_real, sigma_real, images=seen, data=OmegaConf.to_yaml(data_cfg),
                           inception=inception.weights_identity, layer=inception.feature_layer)
            results["saved_reference"] = str(e.save_reference)
    if prefix_psnr:
        results["psnr_vs_tokens"] = {str(k): float(metric.compute()) for k, metric in prefix_psnr.items()}
    token_stats = [token_statistics(c.counts, c.codebook_size) for c in per_codebook]
    if "tokens" in wanted:
        results["tokens"] = token_stats
        results["codebook_usage"] = sum(s["usage"] for s in token_stats) / len(token_stats)

    results["protocol"] = {
        "checkpoint": str(cfg.checkpoint), "weights": e.weights, "round_to_uint8": bool(e.round_to_uint8),
        "evaluation_split": f"{data_cfg._target_} validation split, {seen} images, {cfg.data.image_size}px",
        "crop": e.crop_policy, "fid_reference": reference if inception is not None else None,
        "inception": ({"weights": inception.weights_identity, "layer": inception.feature_layer,
                       "resize": "to 299x299 with TF1-compatible bilinear interpolation (torch-fidelity)"}
                      if inception is not None else None),
        "statistics": "float64 sums; unbiased covariance; Fréchet distance by symmetric eigendecomposition",
        "lpips": ("LPIPS-VGG v0.1 (lpips package), random backbone (tests only)" if e.random_weights
                  else "LPIPS-VGG v0.1 (lpips package)") if lpips_net is not None else None,
        "ssim": "torchmetrics SSIM, gaussian window 11, sigma 1.5, data range 1, mean over the whole map (reflect-padded borders)" if ssim is not None else None,
        "psnr": "mean over images of per-image PSNR, data range 1 (torchmetrics)" if psnr is not None else None,
        "codebook_usage": "distinct codes over the whole split / codebook size, per sub-codebook (exact counts)",
        "psnr_vs_tokens": ("PSNR as above of decode(encode(x)[:, :k]): the first k tokens of each 1D sequence"
                           if prefix_psnr else None),
        "versions": _versions(), "seed": cfg.seed}

    results["protocol"]["world_size"] = world
    if rank != 0:
        return results
    write_json_atomic(run_dir / "metrics.json", results)
    (run_dir / "summary.md").write_text(summary_table(results))
    save_image(grid, run_dir / "reconstructions.png")
    plot_usage_histograms(per_codebook, run_dir / "codebook_usage.png")
    plot_rank_frequency(per_codebook, [s["zipf_exponent"] for s in token_stats], run_dir / "token_rank_frequency.png")
    written = ["metrics.json", "summary.md", "reconstructions.png", "codebook_usage.png", "token_rank_frequency.png"]
    if prefix_psnr:
        plot_psnr_vs_tokens(results["psnr_vs_tokens"], results.get("psnr"), run_dir / "psnr_vs_tokens.png")
        written.append("psnr_vs_tokens.png")
    log.info("\n%s", summary_table(results))
    log.info("wrote %s", ", ".join(str(run_dir / n) for n in written))
    return results


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table of the headline numbers and the protocol essentials."""
    p = results["protocol"]
    rows = [("images", str(results["num_images"]))]
    for key, label, fmt in (("fid", "rFID", "{:.3f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
                            ("lpips", "LPIPS", "{:.4f}")):
        if key in results:
            rows.append((label, fmt.format(results[key])))
    for k, s in enumerate(results.get("tokens", [])):
        zipf = "n/a" if math.isnan(s["zipf_exponent"]) else f"{s['zipf_exponent']:.3f}"
        rows.append((f"sub-codebook {k} ({s['codebook_size']} codes)",
                     f"usage {100 * s['usage']:.1f}%, perplexity {s['perplexity']:.1f}, "
                     f"entropy {s['entropy_bits']:.2f} bits, Zipf s={zipf}"))
    for k, value in results.get("psnr_vs_tokens", {}).items():
        rows.append((f"PSNR, first {k} tokens (dB)", f"{value:.2f}"))
    rows.append(("weights", p["weights"]))
    if p["inception"]:
        rows.append(("FID reference", p["fid_reference"]))
        rows.append(("Inception", f"{p['inception']['weights']}, layer {p['inception']['layer']}"))
    rows.append(("uint8 rounding", str(p["round_to_uint8"])))
    lines = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


