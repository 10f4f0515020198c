"""``probe(cfg, run_dir)``: check the shards and options, train the AR probe, then measure it on the
validation shards, sample, decode, and write ``metrics.json``, ``summary.md``, ``loss_curve.png`` and
``samples.png`` into the run directory (checkpoints under ``checkpoints/``)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from imagetok.data.token_shards import TokenShardDataModule
from imagetok.evaluation.token_language import shard_language_statistics
from imagetok.errors import CheckpointError, ConfigValueError, check
from imagetok.probe.gpt import SUBTOKEN_MODES
from imagetok.probe.layout import TokenLayout
from imagetok.probe.metrics import probe_metrics, unigram_statistics
from imagetok.probe.module import ProbeModule
from imagetok.probe.report import plot_loss_curve, write_summary
from imagetok.probe.samples import (decode, generation_fid, load_shard_tokenizer, sample_tokens, save_sample_grid)
from imagetok.training.callbacks import AtomicCheckpointIO, StepProgressBar, write_json_atomic
from imagetok.training.checks import SUPPORTED_PRECISIONS, resolve_resume
from imagetok.training.cluster import cluster_plugins
from imagetok.training.loggers import build_loggers
from imagetok.training.resume import StepCheckpoint, prune_step_checkpoints, remove_stale_temporaries
from imagetok.training.run import set_cpu_threads

log = logging.getLogger(__name__)
# ShardBatches splits its batches between DataLoader workers itself, so its length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # a resume
# the validation figures are logged after ProbeModule summed them over the ranks itself
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")  # short runs: the CSV still has every step
CONDITIONING = ("auto", "class", "none")


def validate_probe_config(cfg: DictConfig) -> None:
    """Every single-key check, before any shard is opened; each failure names the key."""
    p, s, f = cfg.probe, cfg.sample, cfg.fid
    check(p.subtokens in SUBTOKEN_MODES, "probe.subtokens", p.subtokens, f"one of {list(SUBTOKEN_MODES)}")
    check(p.conditioning in CONDITIONING, "probe.conditioning", p.conditioning,
          "auto (a class token when the shards have labels), class or none")
    check(isinstance(p.class_dropout, (int, float)) and 0 <= p.class_dropout < 1, "probe.class_dropout",
          p.class_dropout, "a float in [0, 1)")
    steps = cfg.trainer.get("max_steps", -1)
    check(isinstance(steps, int) and steps >= 1, "trainer.max_steps", steps, "an integer >= 1")
    precision = str(cfg.trainer.get("precision", "32-true"))
    check(precision in SUPPORTED_PRECISIONS, "trainer.precision", precision, f"one of {SUPPORTED_PRECISIONS}")
    check(isinstance(s.temperature, (int, float)) and s.temperature > 0, "sample.temperature", s.temperature, "a float > 0")
    check(isinstance(s.top_k, int) and s.top_k >= 0, "sample.top_k", s.top_k, "an integer >= 0 (0: no top-k cut)")
    language = cfg.get("token_language_max_images", 0)
    check(language is None or (isinstance(language, int) and not isinstance(language, bool) and language >= 0),
          "token_language_max_images", language, "null (every image), 0 (off) or an integer > 0")
    check(isinstance(s.num_samples, int) and s.num_samples >= 0, "sample.num_samples", s.num_samples, "an integer >= 0")
    check(isinstance(s.batch_size, int) and s.batch_size >= 1, "sample.batch_size", s.batch_size, "an integer >= 1")
    check(f.enabled in ("auto", True, False), "fid.enabled", f.enabled,
          "auto (when the Inception weights are found), true or false")
    check(isinstance(f.num_samples, int) and f.num_samples >= 2, "fid.num_samples", f.num_samples, "an integer >= 2")
    for key in ("width", "depth", "num_heads"):
        value = cfg.probe_model.get(key)
        check(isinstance(value, int) and value >= 1, f"probe_model.{key}", value, "a positive integer")


def conditioning_classes(datamodule: TokenShardDataModule, conditioning: str) -> int | None:
    """The class token's number of classes, or None for an unconditional probe."""
    train, val = datamodule.train, datamodule.val
    if conditioning == "none" or (conditioning == "auto" and not (train.has_labels and val.has_labels)):
        return None
    for shards, key in ((train, "tokens"), (val, "val_tokens")):
        check(shards.has_labels, "probe.conditioning", conditioning,
              f"auto or none: {key}={shards.directory} has no class labels (tokenize an ImageFolder tree with "
              "class subfolders to get them)")
    if train.index.get("label_names") != val.index.get("label_names"):
        raise ConfigValueError("val_tokens", str(val.directory), "shards with the same classes as tokens= "
                               "(their index.json label_names differ)")
    return train.num_classes


def fid_wanted(fid_cfg: DictConfig) -> tuple[bool, str]:
    """Whether to compute gFID, and why not: ``auto`` needs the Inception weights on disk."""
    if fid_cfg.enabled is False:
        return False, "fid.enabled=false"
    if fid_cfg.enabled is True or fid_cfg.random_weights:
        return True, ""
    from imagetok.evaluation.inception import inception_cache_path

    path = Path(fid_cfg.inception_weights).expanduser() if fid_cfg.inception_weights else inception_cache_path()
    found = path.is_file()
    return found, "" if found else f"fid.enabled=auto and no Inception weights at {path} (fid.inception_weights=<file>)"


def check_resume(path: str, module: ProbeModule) -> int:
    """The generator step of probe checkpoint ``path``; refuses (one line) a file that is not a probe
    checkpoint or whose model, layout or conditioning differ from this run's."""
    from imagetok.export.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("hyper_parameters") or {}
    if "layout" not in saved or "subtokens" not in saved:
        raise CheckpointError(f"{path} is not an AR probe checkpoint (no hyper_parameters.layout)")
    now = module.hparams
    differing = [k for k in ("layout", "model", "subtokens", "num_classes") if saved.get(k) != now.get(k)]
    if differing:
        raise CheckpointError(f"resume: {path} holds a probe with another {', '.join(differing)}; drop those "
                              "overrides to continue it, or start a new run in another directory")
    return int(checkpoint.get("global_step", 0))


@dataclass
class ProbeRun:
    """What :func:`probe` leaves behind: the ``metrics.json`` content and the live objects."""

    metrics: dict[str, Any]
    module: ProbeModule
    trainer: L.Trainer
    datamodule: TokenShardDataModule


def probe(cfg: DictConfig, run_dir: str | Path) -> ProbeRun:
    """Train and measure the AR probe as ``cfg`` says, writing everything under ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_probe_config(cfg)
    datamodule = TokenShardDataModule(train_dir=cfg.tokens, val_dir=cfg.val_tokens, seed=cfg.seed,
                                      **OmegaConf.to_container(cfg.data, resolve=True))
    index = datamodule.index
    tokenizer = load_shard_tokenizer(index, cfg.get("pretrained"))  # must load: samples are decoded with it
    layout = TokenLayout.from_index(index, getattr(tokenizer.quantizer, "scales", None))
    num_classes = conditioning_classes(datamodule, cfg.probe.conditioning)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    set_cpu_threads(cfg)
    module = ProbeModule(layout=layout.to_dict(), model=OmegaConf.to_container(cfg.probe_model, resolve=True),
                         subtokens=cfg.probe.subtokens, num_classes=num_classes,
                         class_dropout=float(cfg.probe.class_dropout) if num_classes else 0.0,
                         optim=OmegaConf.to_container(cfg.optim, resolve=True), total_steps=cfg.trainer.max_steps,
                         run_config=OmegaConf.to_container(cfg, resolve=True))
    ckpt_path = resolve_resume(cfg.resume, run_dir, Path(cfg.resume_search_dir))
    resume_step = check_resume(ckpt_path, module) if ckpt_path else None
    parameters = sum(p.numel() for p in module.model.parameters())
    conditioning = f"class token over {num_classes} classes" if num_classes else "unconditional"
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("AR probe: %d training / %d validation images, layout %s, codebook sizes %s, sub-tokens %s, %s; "
                 "%.2fM parameters, %d steps, run dir %s", len(datamodule.train), len(datamodule.val),
                 layout.describe(), list(layout.codebook_sizes), cfg.probe.subtokens, conditioning, parameters / 1e6,
                 cfg.trainer.max_steps, run_dir)
        if ckpt_path:
            log.info("resuming from %s (step %d)", ckpt_path, resume_step)
        for stale in remove_stale_temporaries(run_dir / "checkpoints"):
            log.info("removed %s, left by an interrupted checkpoint write", stale)

    checkpoints = StepCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
                                 every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, monitor="step",
                                 mode="max", save_top_k=cfg.checkpoint.keep, enable_version_counter=False)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.pop("compile", False):
        log.warning("trainer.compile is not used by the probe (its model runs eager)")
    trainer = L.Trainer(**trainer_args, default_root_dir=run_dir, gradient_clip_val=cfg.optim.grad_clip,
                        logger=build_loggers(cfg, run_dir, resume_step),
                        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
                        callbacks=[checkpoints, *([StepProgressBar()] if trainer_args.get("enable_progress_bar", True) else [])])
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = round(time.time() - started, 1)
    if module.last_validation is None or module.last_validation["step"] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the figures are those of the final weights
    if trainer.global_step > 0:
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:
        prune_step_checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep)
    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        metrics = report(cfg, run_dir, module, datamodule, tokenizer, layout, parameters, train_seconds, conditioning)
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in metrics["final"].items() if isinstance(v, float)},
                               step=trainer.global_step)
            logger.save()
    return ProbeRun(metrics, module, trainer, datamodule)


def report(cfg: DictConfig, run_dir: Path, module: ProbeModule, datamodule: TokenShardDataModule, tokenizer,
           layout: TokenLayout, parameters: int, train_seconds: float, conditioning: str) -> dict[str, Any]:
    """Rank 0, after training: figures, samples, gFID and the files (see the module docstring)."""
    unigram = unigram_statistics(datamodule.train)
    language_cap = cfg.get("token_language_max_images", 0)
    language = [] if language_cap == 0 else shard_language_statistics(datamodule.train.directory, language_cap)
    final = probe_metrics(module.last_validation["nll_nats_per_subcodebook"], layout.positions, layout.image_size,
                          [u["entropy_bits"] for u in unigram])
    device = module.device
    model = module.model.eval()
    want_fid, fid_skipped = fid_wanted(cfg.fid)
    count = max(cfg.sample.num_samples, cfg.fid.num_samples if want_fid else 0)
    grid_path, curve_path = run_dir / "samples.png", run_dir / "loss_curve.png"
    gfid = None
    if count:
        tokens, _ = sample_tokens(model, layout, count, batch_size=cfg.sample.batch_size,
                                  temperature=float(cfg.sample.temperature), top_k=int(cfg.sample.top_k),
                                  seed=cfg.seed, device=device)
        images = decode(tokenizer, tokens, cfg.sample.batch_size, device)
        save_sample_grid(images[: max(1, cfg.sample.num_samples)], grid_path)
        if want_fid:
            gfid = generation_fid(images[: cfg.fid.num_samples], datamodule.index,
                                  OmegaConf.to_container(cfg.fid, resolve=True), device)
    plot_loss_curve(module.curve, final["unigram_entropy_bits_per_position"] * math.log(2),
                    curve_path)
    metrics = {
        "final": final, "validation": [{"step": int(s), "nll_nats_per_position": v} for s, v in module.curve["val"]],
        "unigram": unigram, "token_language": language, "layout": layout.to_dict(), "layout_description": layout.describe(),
        "subtokens": cfg.probe.subtokens, "conditioning": conditioning, "num_classes": module.num_classes,
        "steps": module.trainer.global_step, "train_seconds": train_seconds, "parameters": parameters,
        "train_images": len(datamodule.train), "val_images": len(datamodule.val),
        "tokens": str(cfg.tokens), "val_tokens": str(cfg.val_tokens),
        "tokenizer_sha256": datamodule.index["tokenizer_sha256"], "pretrained": cfg.get("pretrained") or datamodule.index.get("pretrained"),
        "samples": {"grid": str(grid_path) if count else None, "num_samples": cfg.sample.num_samples,
                    "temperature": float(cfg.sample.temperature), "top_k": int(cfg.sample.top_k)},
        "gfid": gfid, "loss_curve": str(curve_path), "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "run_dir": str(run_dir), "reference": "GigaTok AR probing, Xiong et al. 2025, arXiv 2504.08736",
    }
    if gfid is None:
        metrics["gfid_skipped"] = fid_skipped or "fid.num_samples samples not drawn"
    write_json_atomic(run_dir / "metrics.json", metrics)
    write_summary(metrics, run_dir / "summary.md")
    log.info("AR probe: validation %.4f bits per position (%.4f per sub-token, %.4f bits per pixel); unigram entropy "
             "%.4f bits per position: gap %+.4f bits%s", final["bits_per_position"], final["bits_per_subtoken"],
             final["bits_per_pixel"] or float("nan"), final["unigram_entropy_bits_per_position"],
             final["gap_bits_per_position"], f"; gFID {gfid['gfid']:.2f}" if gfid else "")
    log.info("wrote %s", ", ".join(str(p) for p in (run_dir / "metrics.json", run_dir / "summary.md", curve_path,
                                                    grid_path) if p.is_file()))
    return metrics
