"""``export(cfg)``: a Lightning training checkpoint -> a ``save_pretrained`` directory with a model
card, and optionally ``torch.export`` programs of encode/decode."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from imagetok.errors import ConfigValueError, check
from imagetok.export.checkpoint import read_checkpoint
from imagetok.export.model_card import lpips_used_in_run, model_card, run_metrics
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _convert_magvit2(cfg: DictConfig, checkpoint: dict) -> Tokenizer:
    """``from=magvit2``: SEED-Voken's Open-MAGVIT2 (LFQ) or IBQ, with ``weights`` and an optional ``config=`` yaml."""
    from imagetok.export.magvit2 import convert_magvit2, load_seed_voken_config

    config = load_seed_voken_config(cfg.config) if cfg.get("config") else None
    return convert_magvit2(checkpoint, config, weights=cfg.weights)


def export_converted(cfg: DictConfig) -> Path:
    """``from=llamagen|taming|magvit2``: another project's checkpoint -> a save_pretrained directory."""
    from imagetok.export.convert import CONVERTERS, load_original_checkpoint

    source = cfg["from"]
    sources = sorted([*CONVERTERS, "magvit2"])
    check(source in sources, "from", source, f"null (an imagetok training checkpoint) or one of {sources}")
    check(cfg.weights in ("ema", "raw"), "weights", cfg.weights, "'ema' or 'raw'")
    checkpoint = load_original_checkpoint(cfg.checkpoint)
    tokenizer = _convert_magvit2(cfg, checkpoint) if source == "magvit2" else CONVERTERS[source](checkpoint)
    card = model_card(tokenizer, {}, None, None, "as published", f"converted from the {source} checkpoint {cfg.checkpoint}")
    out = tokenizer.save_pretrained(cfg.out, extra={"converted_from": source}, card=card)
    log.info("converted %s checkpoint %s to %s", source, cfg.checkpoint, out)
    return out


def export(cfg: DictConfig) -> Path:
    _ = cfg.checkpoint, cfg.out  # a missing required value fails here, in one line, before any work
    if cfg.get("from"):
        return export_converted(cfg)
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
