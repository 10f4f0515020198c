"""One tokenizer over one stream of images: every reconstruction metric, exact token counts, and the
reconstructions of chosen images. ``evaluate.py`` runs it once; ``compare.py`` runs it once per
tokenizer on the same images, sharing the metric networks and the originals' Inception statistics.

Per image the originals and reconstructions are rounded to uint8 first (as saved PNGs would hold
them, ``eval.round_to_uint8``), then: PSNR and SSIM (torchmetrics), LPIPS-VGG (``lpips``), Inception
features for FID (torch-fidelity's network), and exact token counts per sub-codebook; the first
images' whole token sequences are kept (``eval.token_language_max_images``) for the token-language
statistics (:mod:`imagetok.evaluation.token_language`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm import tqdm

from imagetok.data.transforms import CROP_DESCRIPTIONS
from imagetok.errors import ConfigValueError
from imagetok.evaluation.codebook import CodebookUsage
from imagetok.evaluation.fid import FeatureStatistics, frechet_distance, load_reference
from imagetok.evaluation.inception import InceptionFeatures
from imagetok.evaluation.prefixes import TokenPrefix
from imagetok.evaluation.token_language import DEFAULT_MAX_IMAGES, PROTOCOL, language_statistics
from imagetok.evaluation.token_sample import TokenSample
from imagetok.evaluation.tokens import token_statistics
from imagetok.quantizers._utils import all_reduce_sum
from imagetok.tokenizer import Tokenizer


@dataclass
class MetricNetworks:
    """The frozen networks of the metrics ``eval.metrics`` asks for (None where not asked), built once."""

    wanted: frozenset[str]
    lpips: nn.Module | None = None
    inception: InceptionFeatures | None = None


def build_metric_networks(e: DictConfig, device: torch.device, total: int | None) -> MetricNetworks:
    """LPIPS and the FID Inception as ``e`` (the ``eval`` config) asks; a split of ``total`` images
    (None: unknown yet) smaller than the feature dimension is refused for FID against the originals
    unless ``eval.force``. A missing weight file raises :class:`MissingWeightsError` naming it."""
    networks = MetricNetworks(frozenset(e.metrics))
    if "lpips" in networks.wanted:
        from imagetok.losses.perceptual import LPIPS

        networks.lpips = LPIPS(e.lpips_weights, random_backbone=e.random_weights, config_key="eval.lpips_weights").to(device)
    if "fid" in networks.wanted:
        inception = InceptionFeatures(str(e.feature_layer), e.inception_weights, random_weights=e.random_weights)
        networks.inception = inception.to(device)
        if total is not None and total < inception.dim and e.fid_reference == "originals" and not e.force:
            raise ConfigValueError("eval.num_images", total, f">= the feature dimension {inception.dim} for a "
                                   "full-rank covariance (or eval.force=true to compute a rank-deficient FID anyway)")
    return networks


@dataclass
class TokenizerEvaluation:
    """What :func:`evaluate_tokenizer` measured.

    ``metrics``: ``num_images`` and, as asked, ``psnr``, ``ssim``, ``lpips``, ``fid``, ``psnr_vs_tokens``,
    ``tokens`` (per sub-codebook statistics), ``codebook_usage`` (their mean) and ``token_language``
    (per sub-codebook :func:`~imagetok.evaluation.token_language.language_statistics` of the kept
    images, unless ``eval.token_language_max_images`` is 0), in that order.
    ``originals`` / ``reconstructions``: the kept images ``[n, 3, H, W]`` in [-1, 1] (CPU, unclamped
    reconstructions). ``seconds``: wall time of the tokenizer's forward passes alone (encode and
    decode, no metric), summed over batches."""

    metrics: dict[str, Any]
    per_codebook: list
    token_stats: list[dict[str, Any]]
    originals: torch.Tensor
    reconstructions: torch.Tensor
    real_statistics: FeatureStatistics | None
    fid_reference: str | None
    seconds: float


def token_language_images(e: DictConfig) -> int | None:
    """``eval.token_language_max_images``: the images whose tokens are kept for the token-language
    statistics (None: every image, 0: none, the statistics off); 0 unless ``tokens`` is measured."""
    return e.get("token_language_max_images", DEFAULT_MAX_IMAGES) if "tokens" in e.metrics else 0


def _to_unit(recon: torch.Tensor, round_to_uint8: bool) -> torch.Tensor:
    """Reconstruction in [-1, 1] -> [0, 1], rounded through uint8 when the protocol says so."""
    return Tokenizer.to_uint8(recon).float() / 255 if round_to_uint8 else (recon.clamp(-1, 1) + 1) / 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_tokenizer(tokenizer: Tokenizer, images: Iterable[torch.Tensor], e: DictConfig, networks: MetricNetworks,
                       *, device: torch.device, prefixes: Sequence[TokenPrefix] = (), keep: Sequence[int] = range(8),
                       expected: int | None = None, real_statistics: FeatureStatistics | None = None,
                       desc: str = "evaluate", show_progress: bool = True, data_target: str = "data") -> TokenizerEvaluation:
    """Reconstruct every batch of ``images`` (``[B, 3, H, W]`` float in [-1, 1]) with ``tokenizer`` (eval
    mode, on ``device``) and compute the metrics of ``e`` (the ``eval`` config).

    ``prefixes``: prefixes of the tokens (:mod:`imagetok.evaluation.prefixes`) whose decodes' PSNR is
    also measured, keyed by the sub-tokens each keeps.
    ``keep``: positions (in the order this process reads them) of the images whose originals and
    reconstructions are returned. ``real_statistics``: the originals' Inception statistics from an
    earlier pass over the same images (their features are then not computed again). Under
    ``torch.distributed`` every rank calls this with its own share of the images; the sums are
    reduced over ranks (collectives that every rank reaches) and every rank gets the same metrics.
    ``data_target``: the data config's ``_target_``, named when the split turns out empty."""
    wanted, inception = networks.wanted, networks.inception
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device) if "psnr" in wanted else None
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device) if "ssim" in wanted else None
    stats_real = FeatureStatistics(inception.dim) if inception is not None and real_statistics is None else None
    stats_fake = FeatureStatistics(inception.dim) if inception is not None else None
    usage = CodebookUsage(tokenizer.codebook_sizes).to(device)
    max_language_images = token_language_images(e)
    sample = TokenSample(max_language_images, tokenizer.codebook_sizes) if max_language_images != 0 else None
    prefix_psnr = {p: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device) for p in prefixes}
    keep = sorted(set(keep))
    kept_real: list[torch.Tensor] = []
    kept_fake: list[torch.Tensor] = []
    lpips_sum, seen, seconds = 0.0, 0, 0.0

    with torch.no_grad(), tqdm(total=expected, desc=desc, unit="img", disable=not show_progress) as bar:
        for images_batch in images:  # [B, 3, H, W] in [-1, 1]
            batch = images_batch.to(device)
            _synchronize(device)
            start = time.perf_counter()
            recon, quant = tokenizer(batch)
            _synchronize(device)
            seconds += time.perf_counter() - start
            if e.round_to_uint8:
                real_u8, fake_u8 = Tokenizer.to_uint8(batch), Tokenizer.to_uint8(recon)
            else:  # unrounded: uint8 only where a network demands it (Inception)
                real_u8, fake_u8 = None, None
            real = real_u8.float() / 255 if real_u8 is not None else (batch.clamp(-1, 1) + 1) / 2
            fake = fake_u8.float() / 255 if fake_u8 is not None else (recon.clamp(-1, 1) + 1) / 2
            if psnr is not None:
                psnr.update(fake, real)
            if ssim is not None:
                ssim.update(fake, real)
            if networks.lpips is not None:
                lpips_sum += float(networks.lpips(real * 2 - 1, fake * 2 - 1)) * batch.shape[0]
            if stats_real is not None:
                stats_real.update(inception(real_u8 if real_u8 is not None else Tokenizer.to_uint8(batch)))
            if stats_fake is not None:
                stats_fake.update(inception(fake_u8 if fake_u8 is not None else Tokenizer.to_uint8(recon)))
            usage.update(quant.indices)
            if sample is not None:
                sample.update(quant.indices)
            for prefix, metric in prefix_psnr.items():  # the prefix alone, as a decoder of fewer tokens takes it
                metric.update(_to_unit(tokenizer.decode(prefix.take(quant.indices)), e.round_to_uint8), real)
            chosen = [i - seen for i in keep if seen <= i < seen + batch.shape[0]]
            if chosen:
                kept_real.append(batch[chosen].cpu())
                kept_fake.append(recon[chosen].cpu())
            seen += batch.shape[0]
            bar.update(batch.shape[0])

    # every rank reaches these collectives
    seen, lpips_sum = (float(all_reduce_sum(torch.tensor(v, dtype=torch.float64, device=device)))
                       for v in (float(seen), lpips_sum))
    seen = int(seen)
    with usage.sync_context():  # every rank's counts (a collective: every rank reaches it)
        per_codebook = [c.cpu() for c in usage.per_codebook()]
    kept_indices = sample.gathered() if sample is not None else None  # a collective too
    if seen == 0:
        raise ConfigValueError("data", data_target, "a validation split with at least one image")
    if inception is not None and seen < inception.dim and e.fid_reference == "originals" and not e.force:
        # a stream's length is known only now (the same check as build_metric_networks', on every rank alike)
        raise ConfigValueError("eval.num_images", e.num_images, f"a split of >= {inception.dim} images (the "
                               f"feature dimension, for a full-rank covariance): only {seen} were read (or "
                               "eval.force=true to compute a rank-deficient FID anyway)")
    metrics: dict[str, Any] = {"num_images": seen}
    if psnr is not None:
        metrics["psnr"] = float(psnr.compute())
    if ssim is not None:
        metrics["ssim"] = float(ssim.compute())
    if networks.lpips is not None:
        metrics["lpips"] = lpips_sum / seen
    reference = None
    if inception is not None:
        if stats_real is not None:
            stats_real.sync()
        else:
            stats_real = real_statistics
        stats_fake.sync()
        mu_fake, sigma_fake = stats_fake.mean_and_covariance()
        if e.fid_reference == "originals":
            mu_ref, sigma_ref = stats_real.mean_and_covariance()
            reference = f"the {seen} original images of the evaluation split"
        else:
            mu_ref, sigma_ref = load_reference(e.fid_reference)
            reference = f"statistics file {e.fid_reference}"
        metrics["fid"] = frechet_distance(mu_ref, sigma_ref, mu_fake, sigma_fake)
    if prefix_psnr:
        metrics["psnr_vs_tokens"] = {str(p.tokens): float(metric.compute()) for p, metric in prefix_psnr.items()}
    token_stats = [token_statistics(c.counts, c.codebook_size) for c in per_codebook]
    if "tokens" in wanted:
        metrics["tokens"] = token_stats
        metrics["codebook_usage"] = sum(s["usage"] for s in token_stats) / len(token_stats)
        if kept_indices is not None:
            metrics["token_language"] = language_statistics(kept_indices, tokenizer.codebook_sizes)
    empty = torch.empty(0)
    return TokenizerEvaluation(metrics=metrics, per_codebook=per_codebook, token_stats=token_stats,
                               originals=torch.cat(kept_real) if kept_real else empty,
                               reconstructions=torch.cat(kept_fake) if kept_fake else empty,
                               real_statistics=stats_real, fid_reference=reference, seconds=seconds)


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("imagetok", "torch", "torchmetrics", "torch-fidelity", "lpips"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def evaluation_protocol(e: DictConfig, split: str, crop: str | None, networks: MetricNetworks, fid_reference: str | None,
                        prefix_psnr: bool, seed: int, image_size: int | None = None) -> dict[str, Any]:
    """The protocol behind the numbers, as recorded in ``metrics.json`` (``split``: which images,
    ``crop``: the name of the crop that cut them, a key of ``CROP_DESCRIPTIONS``, at ``image_size``)."""
    inception = networks.inception
    return {
        "round_to_uint8": bool(e.round_to_uint8), "evaluation_split": split, "crop": crop,
        "crop_description": CROP_DESCRIPTIONS.get(crop), "image_size": image_size,
        "fid_reference": fid_reference if inception is not None else None,
        "inception": ({"weights": inception.weights_identity, "layer": inception.feature_layer,
                       "resize": "to 299x299 with TF1-compatible bilinear interpolation (torch-fidelity)"}
                      if inception is not None else None),
        "statistics": "float64 sums; unbiased covariance; Fréchet distance by symmetric eigendecomposition",
        "lpips": ("LPIPS-VGG v0.1 (lpips package), random backbone (tests only)" if e.random_weights
                  else "LPIPS-VGG v0.1 (lpips package)") if networks.lpips is not None else None,
        "ssim": ("torchmetrics SSIM, gaussian window 11, sigma 1.5, data range 1, mean over the whole map "
                 "(reflect-padded borders)") if "ssim" in networks.wanted else None,
        "psnr": "mean over images of per-image PSNR, data range 1 (torchmetrics)" if "psnr" in networks.wanted else None,
        "codebook_usage": "distinct codes over the whole split / codebook size, per sub-codebook (exact counts)",
        "token_language": (f"{PROTOCOL}; the split's first {token_language_images(e)} images at most "
                           "(eval.token_language_max_images; null: every image)"
                           if "tokens" in networks.wanted and token_language_images(e) != 0 else None),
        "psnr_vs_tokens": ("PSNR as above of the decode of a prefix of encode(x), keyed by the sub-tokens kept per "
                           "image: the first k tokens of a 1D sequence (ids[:, :k]), the first d residual levels "
                           "(ids[..., :d]) or the first m scales of a multi-scale sequence"
                           if prefix_psnr else None),
        "versions": library_versions(), "seed": seed}
