"""``compare(cfg, run_dir)``: several tokenizers on the same images under the same protocol, in one run.

Every tokenizer is measured by :func:`~imagetok.evaluation.reconstruction.evaluate_tokenizer` (as
``evaluate.py`` measures one) over the same validation split, with metric networks built once and
the originals' Inception statistics computed once (on the first pass) and reused. The files:
``leaderboard.json`` / ``leaderboard.md`` (one row per tokenizer, the protocol once), ``grid.png``
(originals above each tokenizer's reconstructions) and ``index.html`` (:mod:`compare_page`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image, ImageDraw

from imagetok.errors import USER_ERRORS, ConfigValueError, check, user_message
from imagetok.evaluation.bitrate import DEFINITION as BITS_PER_PIXEL
from imagetok.evaluation.bitrate import token_bitrate
from imagetok.evaluation.compare_page import comparison_page
from imagetok.evaluation.reconstruction import (TokenizerEvaluation, build_metric_networks, evaluate_tokenizer,
                                                evaluation_protocol)
from imagetok.evaluation.run import (evaluation_images, init_distributed, load_tokenizer, split_description,
                                     validate_eval_config)
from imagetok.tokenizer import Tokenizer
from imagetok.training.callbacks import reconstruction_grid, write_json_atomic

log = logging.getLogger(__name__)

# leaderboard column: (row key, header, format of a present value); None values print as n/a
COLUMNS = (("fid", "rFID", "{:.3f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
           ("lpips", "LPIPS", "{:.4f}"), ("codebook_usage", "codebook usage", "{:.1%}"),
           ("tokens_per_image", "tokens per image", None), ("bits_per_pixel", "bits per pixel", "{:.4f}"),
           ("images_per_second", "images/s", "{:.1f}"), ("parameters", "parameters", None))
# sort_by keys whose larger values are better (sorted descending); the others ascend
HIGHER_IS_BETTER = frozenset({"psnr", "ssim", "codebook_usage", "images_per_second"})
SORT_KEYS = ("name", *(key for key, _, _ in COLUMNS))
THROUGHPUT = ("images_per_second = images / wall time of the tokenizer's forward passes (encode + decode, "
              "synchronised on GPUs), batch size eval.batch_size, after one untimed warm-up batch; metric "
              "networks and data loading excluded")


def default_names(paths: Sequence[str]) -> list[str]:
    """A short display name per tokenizer: the directory's name, or ``run/last`` for
    ``run/checkpoints/last.ckpt``; the whole path where two short names would clash."""
    def short(path: Path) -> str:
        if path.suffix == ".ckpt":
            return f"{path.parent.parent.name}/{path.stem}" if path.parent.name == "checkpoints" else path.stem
        return path.name or str(path)

    names = [short(Path(p)) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def validate_compare_config(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """The tokenizer paths and their display names; a bad ``tokenizers``, ``names``, ``sort_by`` or
    ``num_grid_images`` raises :class:`ConfigValueError` naming the key."""
    paths = cfg.tokenizers
    if isinstance(paths, str):
        paths = [paths]
    check(isinstance(paths, (list, ListConfig)) and len(paths) > 0, "tokenizers", paths,
          "a non-empty list of save_pretrained directories or .ckpt files, e.g. tokenizers=[dirA,dirB]")
    paths = [str(p) for p in paths]
    names = default_names(paths) if cfg.names is None else [str(n) for n in cfg.names]
    check(len(names) == len(paths) and len(set(names)) == len(names), "names", names,
          f"null or {len(paths)} distinct display names, one per entry of tokenizers")
    check(cfg.sort_by is None or cfg.sort_by in SORT_KEYS, "sort_by", cfg.sort_by, f"null (as given) or one of {list(SORT_KEYS)}")
    n = cfg.num_grid_images
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "num_grid_images", n, "an integer >= 1")
    return paths, names


def load_tokenizers(paths: Sequence[str], weights: str) -> list[Tokenizer]:
    """Every tokenizer, before any is evaluated: one that fails to load stops the run naming its entry."""
    tokenizers = []
    for i, path in enumerate(paths):
        try:
            tokenizers.append(load_tokenizer(path, weights))
        except ConfigValueError as err:
            raise ConfigValueError(f"tokenizers[{i}]", err.value, err.allowed) from None
        except USER_ERRORS as err:
            raise type(err)(f"tokenizers[{i}]={path}: {user_message(err)}") from None
    return tokenizers


def leaderboard_row(name: str, path: str, tokenizer: Tokenizer, run: TokenizerEvaluation, image_size: int) -> dict[str, Any]:
    """One tokenizer's numbers (None where a metric was not asked for)."""
    m = run.metrics
    return {"name": name, "tokenizer": path, "num_images": m["num_images"],
            **{key: m.get(key) for key in ("fid", "psnr", "ssim", "lpips", "codebook_usage")},
            **token_bitrate(tokenizer.token_shape(image_size), tokenizer.codebook_sizes, image_size),
            "codebook_sizes": list(tokenizer.codebook_sizes),
            "images_per_second": m["num_images"] / run.seconds if run.seconds > 0 else None,
            "parameters": sum(p.numel() for p in tokenizer.parameters())}


def sort_rows(rows: list[dict[str, Any]], sort_by: str | None) -> list[dict[str, Any]]:
    """As given (None), or by ``sort_by`` best first; rows without that number go last."""
    if sort_by is None:
        return rows
    present = [r for r in rows if r[sort_by] is not None]
    missing = [r for r in rows if r[sort_by] is None]
    return sorted(present, key=lambda r: r[sort_by], reverse=sort_by in HIGHER_IS_BETTER) + missing


def cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    """A leaderboard cell as text: ``n/a`` for a metric not measured."""
    value = row[key]
    if value is None:
        return "n/a"
    if key == "tokens_per_image":
        return f"{value} x {row['sub_tokens_per_token']}"
    if key == "parameters":
        return f"{value / 1e6:.2f} M"
    return fmt.format(value)


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The protocol essentials as short Markdown bullet lines (the full record is in leaderboard.json)."""
    lines = [f"- images: {protocol['evaluation_split']}",
             f"- crop: {protocol['crop']}, {protocol['image_size']} px ({protocol['crop_description']})",
             f"- rounding to uint8 before every metric: {protocol['round_to_uint8']}"]
    if protocol["inception"]:
        lines.append(f"- rFID reference: {protocol['fid_reference']}; Inception {protocol['inception']['weights']}, "
                     f"layer {protocol['inception']['layer']}")
    for key in ("psnr", "ssim", "lpips"):
        if protocol[key]:
            lines.append(f"- {key.upper()}: {protocol[key]}")
    versions = ", ".join(f"{k} {v}" for k, v in protocol["versions"].items())
    lines += [f"- bits per pixel: {protocol['bits_per_pixel']}", f"- images/s: {protocol['images_per_second']}",
              f"- versions: {versions}"]
    return lines


def leaderboard_markdown(rows: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    """The protocol once, then the table: one row per tokenizer."""
    header = "| tokenizer | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = ["# Tokenizer comparison", "", *protocol_lines(protocol), "", header,
             "|---|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join([row["name"], *(cell(row, key, fmt) for key, _, fmt in COLUMNS)]) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_grid(originals: torch.Tensor, reconstructions: Sequence[torch.Tensor], labels: Sequence[str],
                    min_tile: int = 128) -> Image.Image:
    """Originals in the first row, each tokenizer's reconstructions in the next ones, a text label left
    of each row. Inputs ``[N, 3, H, W]`` in [-1, 1]; small crops are enlarged by an integer factor
    (nearest neighbour), as in training's reconstruction grid."""
    grid = reconstruction_grid(originals, torch.cat(list(reconstructions)), min_tile=min_tile)  # [3, H', W'] in [0, 1]
    pixels = Image.fromarray(grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    measure = ImageDraw.Draw(pixels)
    label_width = 12 + int(max(measure.textlength(label) for label in labels))
    page = Image.new("RGB", (pixels.width + label_width, pixels.height), "white")
    page.paste(pixels, (label_width, 0))
    draw = ImageDraw.Draw(page)
    row_height = (pixels.height - 2) / len(labels)  # make_grid: 2 px padding around every tile
    for r, label in enumerate(labels):
        draw.text((4, int(2 + (r + 0.5) * row_height) - 5), label, fill="black")
    return page


def _check_image_size(index: int, forward: Callable[[], Any]) -> None:
    """Run ``forward``; an image size the tokenizer cannot take names its ``tokenizers`` entry."""
    try:
        forward()
    except ConfigValueError as err:
        if err.key != "images":
            raise
        raise err.with_prefix(f"tokenizers[{index}]") from None


def compare(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate every entry of ``cfg.tokenizers`` on the ``cfg.data`` validation split under
    ``cfg.eval``; writes ``leaderboard.json``, ``leaderboard.md``, ``grid.png`` and ``index.html``
    under ``run_dir`` and returns ``{"protocol": ..., "leaderboard": [row, ...]}``."""
    e = cfg.eval
    validate_eval_config(e)
    paths, names = validate_compare_config(cfg)
    run_dir = Path(run_dir)
    rank, world, device = init_distributed()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizers = load_tokenizers(paths, e.weights)
    data_cfg, datamodule, images = evaluation_images(cfg, rank, world)
    networks = build_metric_networks(e, device, images.total)  # once, for every tokenizer
    size = datamodule.image_size
    warm_up = next(iter(images), None)  # [B, 3, H, W]: one untimed pass per tokenizer first (kernels, caches)
    rows, runs, real_statistics = [], [], None
    for i, (name, path, tokenizer) in enumerate(zip(names, paths, tokenizers)):
        tokenizer.to(device)
        if warm_up is not None:
            with torch.no_grad():
                _check_image_size(i, lambda: tokenizer(warm_up.to(device)))
        run = evaluate_tokenizer(tokenizer, images, e, networks, device=device, keep=range(cfg.num_grid_images),
                                 expected=images.expected, real_statistics=real_statistics,
                                 desc=f"{name} ({i + 1}/{len(paths)})", show_progress=rank == 0,
                                 data_target=data_cfg._target_)
        tokenizer.cpu()
        real_statistics = run.real_statistics if real_statistics is None else real_statistics
        if runs and not torch.equal(runs[0].originals, run.originals):
            log.warning("the kept originals differ between passes: the data config's validation crops are not "
                        "deterministic, so the tokenizers did not see exactly the same images")
        runs.append(run)
        rows.append(leaderboard_row(name, path, tokenizer, run, size))

    first = runs[0]
    protocol = {"tokenizers": dict(zip(names, paths)), "weights": e.weights,
                **evaluation_protocol(e, split_description(data_cfg, first.metrics["num_images"]),
                                      datamodule.val_crop_name, networks, first.fid_reference, False, cfg.seed,
                                      image_size=size),
                "bits_per_pixel": BITS_PER_PIXEL, "images_per_second": THROUGHPUT, "device": str(device),
                "world_size": world}
    order = sort_rows(rows, cfg.sort_by)
    results = {"protocol": protocol, "sort_by": cfg.sort_by, "leaderboard": order}
    if rank != 0:
        return results
    write_json_atomic(run_dir / "leaderboard.json", results)
    markdown = leaderboard_markdown(order, protocol)
    (run_dir / "leaderboard.md").write_text(markdown)
    comparison_grid(first.originals, [r.reconstructions for r in runs], ["original", *names]).save(run_dir / "grid.png")
    table = [[row["name"], *(cell(row, key, fmt) for key, _, fmt in COLUMNS)] for row in order]
    page = comparison_page(["tokenizer", *(label for _, label, _ in COLUMNS)], table, protocol_lines(protocol),
                           first.originals, [r.reconstructions for r in runs], names)
    (run_dir / "index.html").write_text(page, encoding="utf-8")
    log.info("\n%s", markdown)
    log.info("wrote %s", ", ".join(str(run_dir / n) for n in ("leaderboard.json", "leaderboard.md", "grid.png", "index.html")))
    return results
