"""``export(cfg)``: a Lightning training checkpoint -> a ``save_pretrained`` directory with a model
card, and optionally ``torch.export`` programs of encode/decode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from imagetok.errors import ConfigValueError, check
from imagetok.export.checkpoint import read_checkpoint
from imagetok.export.model_card import lpips_used_in_run, model_card, run_metrics
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def foreign_sources() -> list[str]:
    """The ``from=`` names of other projects' formats (those with a converter)."""
    from imagetok.export.converters import FORMATS

    return sorted(name for name, source in FORMATS.items() if source.convert is not None)


def converter_options(cfg: DictConfig) -> dict[str, Any]:
    """The export keys a converter may declare in its ``SourceFormat.options`` (``config=``: a source
    project's own config file, ``weights=``: EMA or raw, ``checkpoint_path``: where the checkpoint was
    read, for a converter that reads files next to it, ``pixel_range=``: the source's image range); each
    format receives only those it declares."""
    pixel_range = cfg.get("pixel_range")
    return {"config": cfg.get("config"), "weights": cfg.weights, "checkpoint_path": Path(cfg.checkpoint),
            "pixel_range": OmegaConf.to_container(pixel_range) if OmegaConf.is_config(pixel_range) else pixel_range}


def export_converted(cfg: DictConfig, source: str, checkpoint: Any) -> Path:
    """Another project's ``checkpoint`` (loaded from ``cfg.checkpoint``) in format ``source`` -> a
    save_pretrained directory."""
    from imagetok.export.converters import convert_checkpoint

    tokenizer = convert_checkpoint(source, checkpoint, Path(cfg.checkpoint), **converter_options(cfg))
    card = model_card(tokenizer, {}, None, None, "as published", f"converted from the {source} checkpoint {cfg.checkpoint}")
    out = tokenizer.save_pretrained(cfg.out, extra={"converted_from": source}, card=card)
    log.info("converted %s checkpoint %s to %s", source, cfg.checkpoint, out)
    return out


def export(cfg: DictConfig) -> Path:
    """``from=null``: an imagetok training checkpoint; ``from=<project>``: that project's checkpoint;
    ``from=auto``: whichever of these the file is, told apart by its entries' names (one log line says which)."""
    _ = cfg.checkpoint, cfg.out  # a missing required value fails here, in one line, before any work
    source = cfg.get("from")
    if source:
        from imagetok.export.converters import FORMATS, detect_format, load_original_checkpoint

        check(source == "auto" or source in foreign_sources(), "from", source,
              f"null (an imagetok training checkpoint), auto (detect the format) or one of {foreign_sources()}")
        check(cfg.weights in ("ema", "raw"), "weights", cfg.weights, "'ema' or 'raw'")
        checkpoint = load_original_checkpoint(cfg.checkpoint)
        if source == "auto":
            found = detect_format(checkpoint, Path(cfg.checkpoint), **converter_options(cfg))
            log.info("from=auto: %s is a checkpoint in the %s format", cfg.checkpoint, found.name)
            source = found.name
        if FORMATS[source].convert is not None:
            return export_converted(cfg, source, checkpoint)
        del checkpoint  # imagetok's own: read again below as a training checkpoint
    check(cfg.weights in ("ema", "raw"), "weights", cfg.weights, "'ema' or 'raw'")
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_file():
        raise ConfigValueError("checkpoint", cfg.checkpoint, "the path of an existing Lightning .ckpt file")
    tokenizer = Tokenizer.from_checkpoint(checkpoint, weights=cfg.weights)
    saved = read_checkpoint(checkpoint)
    run_config = saved.get("hyper_parameters", {}).get("config", {}) or {}
    steps = saved.get("global_step")
    card = model_card(tokenizer, run_config, steps, run_metrics(checkpoint, cfg.evaluation), cfg.weights, str(checkpoint),
                      lpips_used=lpips_used_in_run(checkpoint))
    out = tokenizer.save_pretrained(cfg.out, extra={"training_steps": steps, "image_size": run_config.get("data", {}).get("image_size")},
                                    card=card)
    written = ["config.json", "model.safetensors", "README.md"]
    if cfg.serving:
        from imagetok.export.serving import save_programs

        size = int(run_config.get("data", {}).get("image_size", 256))
        example = torch.zeros(cfg.serving_batch_size, 3, size, size)
        written += [p.name for p in save_programs(tokenizer, example, out)]
    log.info("exported %s weights of %s to %s: %s", cfg.weights, checkpoint, out, ", ".join(written))
    return out
