"""``evaluate(cfg, run_dir)``: reconstruct an evaluation split and write every metric with its protocol.

The measuring itself is :func:`imagetok.evaluation.reconstruction.evaluate_tokenizer` (shared with
``compare.py``); this module loads the tokenizer and the split, and writes the files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from imagetok.data.inference import InferenceImages
from imagetok.errors import ConfigValueError, check
from imagetok.evaluation.bitrate import DEFINITION as BITS_PER_PIXEL
from imagetok.evaluation.bitrate import token_bitrate
from imagetok.evaluation.fid import save_reference
from imagetok.evaluation.prefixes import token_prefixes
from imagetok.evaluation.plots import plot_psnr_vs_tokens, plot_rank_frequency, plot_usage_histograms
from imagetok.evaluation.reconstruction import build_metric_networks, evaluate_tokenizer, evaluation_protocol
from imagetok.evaluation.token_language import token_language_rows
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
    language = e.get("token_language_max_images")
    check(language is None or (isinstance(language, int) and not isinstance(language, bool) and language >= 0),
          "eval.token_language_max_images", language, "null (every image), 0 (no token-language statistics) or an "
          "integer >= 1")
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


def evaluation_images(cfg: DictConfig, rank: int = 0, world: int = 1) -> tuple[DictConfig, Any, InferenceImages]:
    """The data config as used (the sample data draws ``eval.num_images`` crops), its datamodule, and
    this rank's batches of the validation split (``[B, 3, H, W]`` in [-1, 1]); shared with ``compare.py``."""
    from imagetok.training.run import instantiate_part  # the same config-error handling as training

    e = cfg.eval
    data_cfg = cfg.data.copy()
    if e.num_images is not None and "val_samples" in data_cfg:  # the sample data draws as many crops as asked
        data_cfg.val_samples = e.num_images
    datamodule = instantiate_part(data_cfg, "data")
    # a webdataset stream gives each rank its own shards; an indexed split is divided by image index
    images = InferenceImages(datamodule.val_dataset(), batch_size=e.batch_size, num_workers=datamodule.num_workers,
                             num_images=e.num_images, rank=rank, world=world)
    return data_cfg, datamodule, images


def split_description(data_cfg: DictConfig, seen: int) -> str:
    """``protocol.evaluation_split``: which images were evaluated."""
    return f"{data_cfg._target_} validation split, {seen} images, {data_cfg.image_size}px"


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on the ``cfg.data`` validation split; writes ``metrics.json``,
    ``summary.md``, ``reconstructions.png``, ``codebook_usage.png`` and ``token_rank_frequency.png``
    under ``run_dir`` and returns the metrics dict: ``num_images``, the token rate (``tokens_per_image``,
    ``sub_tokens_per_token``, ``bits_per_pixel``; see :mod:`imagetok.evaluation.bitrate`), every metric
    asked for, ``bits_per_pixel_vs_tokens`` next to ``psnr_vs_tokens``, and ``protocol``."""
    e = cfg.eval
    validate_eval_config(e)
    run_dir = Path(run_dir)
    rank, world, device = init_distributed()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.checkpoint, e.weights).to(device)
    data_cfg, datamodule, images_of_rank = evaluation_images(cfg, rank, world)
    networks = build_metric_networks(e, device, images_of_rank.total)  # total: over all ranks (None: unknown)
    size = datamodule.image_size
    counts = prefix_lengths(tokenizer, e.get("num_tokens"))
    off = e.get("num_tokens") is not None and not counts  # eval.num_tokens=[]: no prefixes of any family
    prefixes = [] if off else token_prefixes(tokenizer, size, counts)
    run = evaluate_tokenizer(tokenizer, images_of_rank, e, networks, device=device, prefixes=prefixes,
                             keep=range(min(8, e.batch_size)), expected=images_of_rank.expected,
                             desc=f"evaluate (rank {rank}/{world})" if world > 1 else "evaluate",
                             show_progress=rank == 0, data_target=data_cfg._target_)
    seen = run.metrics["num_images"]
    results = {"num_images": seen, **token_bitrate(tokenizer.token_shape(size), tokenizer.codebook_sizes, size),
               **run.metrics}
    if prefixes:
        results["bits_per_pixel_vs_tokens"] = {str(p.tokens): p.bits / size**2 for p in prefixes}
        results["prefixes"] = [p.to_dict() for p in prefixes]
    if "fid" in results and e.save_reference and rank == 0:
        mu_real, sigma_real = run.real_statistics.mean_and_covariance()
        save_reference(e.save_reference, mu_real, sigma_real, images=seen, data=OmegaConf.to_yaml(data_cfg),
                       inception=networks.inception.weights_identity, layer=networks.inception.feature_layer)
        after_fid = list(results.items())
        position = [k for k, _ in after_fid].index("fid") + 1
        results = dict(after_fid[:position] + [("saved_reference", str(e.save_reference))] + after_fid[position:])

    split = split_description(data_cfg, seen)
    results["protocol"] = {"checkpoint": str(cfg.checkpoint), "weights": e.weights,
                           **evaluation_protocol(e, split, datamodule.val_crop_name, networks, run.fid_reference,
                                                 bool(prefixes), cfg.seed, image_size=size),
                           "bits_per_pixel": BITS_PER_PIXEL, "world_size": world}
    if rank != 0:
        return results
    per_codebook, token_stats = run.per_codebook, run.token_stats
    write_json_atomic(run_dir / "metrics.json", results)
    (run_dir / "summary.md").write_text(summary_table(results))
    save_image(reconstruction_grid(run.originals, run.reconstructions), run_dir / "reconstructions.png")
    plot_usage_histograms(per_codebook, run_dir / "codebook_usage.png")
    plot_rank_frequency(per_codebook, [s["zipf_exponent"] for s in token_stats], run_dir / "token_rank_frequency.png")
    written = ["metrics.json", "summary.md", "reconstructions.png", "codebook_usage.png", "token_rank_frequency.png"]
    if prefixes:
        plot_psnr_vs_tokens(results["psnr_vs_tokens"], results.get("psnr"), run_dir / "psnr_vs_tokens.png",
                            prefixes[0].kind)
        written.append("psnr_vs_tokens.png")
    log.info("\n%s", summary_table(results))
    log.info("wrote %s", ", ".join(str(run_dir / n) for n in written))
    return results


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table of the headline numbers and the protocol essentials."""
    p = results["protocol"]
    rows = [("images", str(results["num_images"])),
            ("tokens per image", f"{results['tokens_per_image']} x {results['sub_tokens_per_token']} sub-token"
                                 f"{'s' if results['sub_tokens_per_token'] > 1 else ''}"),
            ("bits per pixel", f"{results['bits_per_pixel']:.4f}")]
    for key, label, fmt in (("fid", "rFID", "{:.3f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
                            ("lpips", "LPIPS", "{:.4f}")):
        if key in results:
            rows.append((label, fmt.format(results[key])))
    for k, s in enumerate(results.get("tokens", [])):
        zipf = "n/a" if math.isnan(s["zipf_exponent"]) else f"{s['zipf_exponent']:.3f}"
        rows.append((f"sub-codebook {k} ({s['codebook_size']} codes)",
                     f"usage {100 * s['usage']:.1f}%, perplexity {s['perplexity']:.1f}, "
                     f"entropy {s['entropy_bits']:.2f} bits, Zipf s={zipf}"))
    for k, s in enumerate(results.get("token_language", [])):
        rows.extend(token_language_rows(k, s))
    for prefix in results.get("prefixes", []):
        k = str(prefix["tokens"])
        rows.append((f"PSNR, {prefix['label']} (dB)",
                     f"{results['psnr_vs_tokens'][k]:.2f} at {results['bits_per_pixel_vs_tokens'][k]:.4f} bpp"))
    rows.append(("weights", p["weights"]))
    rows.append(("crop", f"{p['crop']}, {p['image_size']} px"))
    if p["inception"]:
        rows.append(("FID reference", p["fid_reference"]))
        rows.append(("Inception", f"{p['inception']['weights']}, layer {p['inception']['layer']}"))
    rows.append(("uint8 rounding", str(p["round_to_uint8"])))
    lines = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"
