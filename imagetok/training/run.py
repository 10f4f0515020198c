"""``train(cfg)``: validate the config, build every part, fit, and write the run's summary."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from imagetok.errors import ConfigValueError, check
from imagetok.tokenizer import Tokenizer
from imagetok.training.callbacks import (AtomicCheckpointIO, ReconstructionImages, StepProgressBar, ValidationHistory,
                                         write_json_atomic)
from imagetok.training.checks import check_resume_checkpoint, resolve_resume, validate_config
from imagetok.training.cluster import cluster_plugins
from imagetok.losses.proxy_codes import PROXY_DECODER, ProxyCodeLoss
from imagetok.training.initial_weights import freeze_parts, load_initial_weights
from imagetok.training.loggers import build_loggers
from imagetok.training.module import TokenizerTrainingModule
from imagetok.training.resume import StepCheckpoint, prune_step_checkpoints, remove_stale_temporaries, resume_config
from imagetok.training.rng_state import RandomState
from imagetok.training.schedule import scaled_lr
from imagetok.training.strategy import (GeneratorDiscriminatorDDPStrategy, ShardedGeneratorDiscriminatorStrategy,
                                        wants_ddp)

log = logging.getLogger(__name__)
# Expected here, not a problem: the EMA copy is always in eval mode.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # a resume: see resume.py
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")  # short runs: the CSV still has every step
# CPU (mkldnn) returns 1x1-conv gradients in another memory layout; DDP copies them, correct but noisy.
warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides")


def instantiate_part(node: DictConfig, key: str) -> Any:
    """``hydra.utils.instantiate`` whose config errors name the full key (``loss.disc_start``) instead
    of arriving wrapped in Hydra's exception."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigValueError):
            # Hydra records where in the tree the failing object sits (e.g. loss.discriminator)
            where = re.search(r"full_key: (\S+)", str(err))
            raise cause.with_prefix(where.group(1) if where else key) from None
        if cause is not None and type(cause).__name__ == "MissingWeightsError":
            raise cause from None
        raise


def tokenizer_config(cfg: DictConfig) -> dict[str, Any]:
    """The JSON-able part of the run config that rebuilds the tokenizer."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("encoder", "quantizer", "decoder")}


def execution_config(cfg: DictConfig) -> dict[str, Any]:
    """How the networks run (training/performance.py): ``trainer.compile`` and the ``model`` keys."""
    model = cfg.get("model") or {}
    return {"compile": cfg.trainer.get("compile", False), "channels_last": model.get("channels_last", "auto"),
            "activation_checkpointing": model.get("activation_checkpointing", False)}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(cfg: DictConfig) -> tuple[TokenizerTrainingModule, L.LightningDataModule]:
    """Validate and build everything that can fail on a bad value, before any training starts."""
    validate_config(cfg)
    datamodule = instantiate_part(cfg.data, "data")
    # The tokenizer before the loss: a bad model value should not wait for LPIPS weights to be looked up.
    proxy_codes = build_proxy_codes(cfg)  # completes cfg.decoder from its teacher
    tok_config = tokenizer_config(cfg)
    tokenizer = Tokenizer.from_config(tok_config)
    tokenizer.token_shape(cfg.data.image_size)  # a token layout that cannot hold this image size fails here
    if proxy_codes is not None:
        proxy_codes.load_teacher(tokenizer.decoder)
    if cfg.get("init_from"):  # before the EMA copy is made, so that it starts from these weights too
        count = load_initial_weights(tokenizer, cfg.init_from)
        if rank_zero_only.rank == 0:
            log.info("init_from: %d tokenizer tensors from %s", count, cfg.init_from)
    frozen = freeze_parts(tokenizer, list(cfg.get("freeze") or []))
    loss = instantiate_loss(cfg, proxy_codes)
    module = TokenizerTrainingModule(
        tok_config, loss, OmegaConf.to_container(cfg.optim, resolve=True),
        total_steps=cfg.trainer.max_steps, ema_decay=cfg.ema_decay,
        run_config=OmegaConf.to_container(cfg, resolve=True), tokenizer=tokenizer, execution=execution_config(cfg))
    if getattr(loss, "repa", None) is not None:  # after the EMA copy was made: only the trained decoder is hooked
        if tokenizer.is_sequence:
            raise ConfigValueError("loss.repa", "dinov2", "null for 1D token-sequence tokenizers (REPA aligns a "
                                   "decoder feature map on the token grid: CNN or ViT decoders)")
        loss.repa.attach(tokenizer.decoder, tuple(tokenizer.token_shape(cfg.data.image_size)[:2]))
    module.frozen_parts = frozen
    return module, datamodule


def instantiate_loss(cfg: DictConfig, proxy_codes: ProxyCodeLoss | None) -> Any:
    """``cfg.loss``, with the proxy-code loss built by :func:`build_proxy_codes` (its teacher loads once)."""
    if proxy_codes is None:
        return instantiate_part(cfg.loss, "loss")
    node = cfg.loss.proxy_codes
    with open_dict(cfg):
        cfg.loss.proxy_codes = None
    try:
        loss = instantiate_part(cfg.loss, "loss")
    finally:
        with open_dict(cfg):
            cfg.loss.proxy_codes = node
    loss.set_proxy_codes(proxy_codes)
    return loss


def build_proxy_codes(cfg: DictConfig) -> ProxyCodeLoss | None:
    """TiTok's proxy codes (``decoder=proxy_codes``, ``loss/proxy_codes=teacher``): the loss, with its
    teacher loaded, after it has filled ``cfg.decoder`` with the teacher's shape; None without them."""
    if cfg.loss.get("proxy_codes") is None:
        if cfg.decoder.get("_target_") == PROXY_DECODER:
            raise ConfigValueError("loss.proxy_codes", None, "a teacher for decoder=proxy_codes: "
                                   "loss/proxy_codes=teacher loss.proxy_codes.teacher=<grid tokenizer checkpoint>")
        return None
    proxy_codes = instantiate_part(cfg.loss.proxy_codes, "loss.proxy_codes")
    proxy_codes.complete_decoder_config(cfg)
    return proxy_codes


def scale_learning_rates(module: TokenizerTrainingModule, cfg: DictConfig, trainer: L.Trainer) -> None:
    """Apply ``optim.lr_scaling`` to the module's learning rates for this run's global batch (per-device
    batch x devices x nodes; there is no gradient accumulation, see checks.py), and log the batch and
    rates the run trains with. A resumed run trains with these rates too (the module's on_train_start)."""
    o = module.optim
    devices, nodes = trainer.num_devices, trainer.num_nodes
    global_batch = cfg.data.batch_size * devices * nodes
    rule, base = o.get("lr_scaling", "none"), o.get("base_batch_size")
    base_lr, base_disc_lr = o["lr"], o.get("disc_lr") or o["lr"]
    o["lr"] = scaled_lr(base_lr, rule, global_batch, base)
    o["disc_lr"] = scaled_lr(base_disc_lr, rule, global_batch, base)
    how = "lr_scaling=none" if rule == "none" else f"lr_scaling={rule}, base_batch_size={base}"
    if rank_zero_only.rank == 0:
        log.info("batch %d per device x %d device(s) x %d node(s) = global batch %d; lr %.3g -> %.3g, "
                 "disc_lr %.3g -> %.3g (%s)", cfg.data.batch_size, devices, nodes, global_batch,
                 base_lr, o["lr"], base_disc_lr, o["disc_lr"], how)


def busy_cores(seconds: float = 0.3) -> float:
    """How many cores other processes keep busy now: Linux's ``/proc/stat`` sampled ``seconds`` apart
    (the 1-minute load average elsewhere, which lags: a job that just ended still counts there)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total and idle + iowait jiffies, all cores

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


def set_cpu_threads(cfg: DictConfig) -> None:
    """``cpu_threads`` for a run on the CPU: torch's intra-op threads per process. ``auto`` (the default)
    keeps ``OMP_NUM_THREADS`` when it is set, and otherwise takes the cores idle when the run starts
    (:func:`busy_cores`; at least 1), split over the processes of this machine: with every core free, one thread per core trained 1.5x faster
    than one thread; on cores that other jobs keep busy, extra threads wait for the slowest core at
    every op, and one thread was faster and steadier (benchmarks/cpu_threads.py)."""
    if cfg.trainer.get("accelerator") != "cpu":
        return
    threads = cfg.get("cpu_threads", "auto")
    if threads == "auto" and os.environ.get("OMP_NUM_THREADS"):
        return  # the user's (or the job script's) own choice; torch has read it
    if threads == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = cfg.trainer.get("devices", 1) if isinstance(cfg.trainer.get("devices", 1), int) else 1
        busy = busy_cores()
        threads = max(1, (cores - round(busy)) // max(1, processes))
        threads = min(threads, max(1, cores // max(1, processes)))
        if rank_zero_only.rank == 0:
            log.info("CPU: %d torch thread(s) per process (%d cores, %.1f busy with other work; cpu_threads=N "
                     "sets it)", threads, cores, busy)
    check(isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1, "cpu_threads", threads,
          "a positive integer or auto")
    torch.set_num_threads(threads)


@dataclass
class TrainingRun:
    """What :func:`train` leaves behind: the summary written to ``metrics.json`` and the live objects."""

    summary: dict[str, Any]
    module: TokenizerTrainingModule
    trainer: L.Trainer
    datamodule: L.LightningDataModule


def train(cfg: DictConfig, run_dir: str | Path, defaults: DictConfig | None = None) -> TrainingRun:
    """Train as ``cfg`` says, writing checkpoints, images and ``metrics.json`` under ``run_dir``.

    A resumed run (``cfg.resume``) takes every setting that ``cfg`` does not change against ``defaults``
    (the config without the command's overrides) from the checkpoint; without ``defaults``, ``cfg`` wins
    in full. Either way the differences are logged and an architecture change is refused (see resume.py)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_resume(cfg.resume, run_dir, Path(cfg.resume_search_dir))
    resume_step = None
    if ckpt_path:
        saved_config, resume_step = check_resume_checkpoint(ckpt_path)
        cfg, differences = resume_config(cfg, saved_config, defaults)
        if rank_zero_only.rank == 0:
            log.info("resuming with the settings from the checkpoint%s", "; this command changes " + ", ".join(
                differences) if differences else " (this command changes none of them)")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    set_cpu_threads(cfg)
    module, datamodule = build(cfg)
    if rank_zero_only.rank == 0:  # Lightning's DDP launcher re-runs this script for the other ranks
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    tok = module.tokenizer
    token_shape = "x".join(map(str, tok.token_shape(cfg.data.image_size)))  # h x w x K, or L x 1 (multi-scale)
    log.info("tokenizer: %.2fM parameters (encoder %.2fM, decoder %.2fM), discriminator %.2fM; "
             "%dx%d image -> %s tokens, codebook sizes %s", _count(tok) / 1e6, _count(tok.encoder) / 1e6,
             _count(tok.decoder) / 1e6, _count(module.loss.discriminator) / 1e6, cfg.data.image_size,
             cfg.data.image_size, token_shape, tok.codebook_sizes)
    frozen = getattr(module.loss.discriminator, "backbone", None)
    if frozen is not None:
        log.info("discriminator reads a frozen %s (%.1fM parameters, %s; not trained, not in checkpoints)",
                 frozen.model, _count(frozen) / 1e6, "RANDOM weights: tests only" if frozen.random else "pretrained")
    log.info("%d generator steps, discriminator from step %d, precision %s, run dir %s",
             cfg.trainer.max_steps, cfg.loss.disc_start, cfg.trainer.get("precision"), run_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    elif cfg.resume == "last":
        log.info("resume=last: no checkpoint found in %s or under %s; starting fresh", run_dir, cfg.resume_search_dir)

    history = ValidationHistory(run_dir)
    extra_callbacks = []
    if cfg.get("val_fid") and cfg.val_fid.enabled:  # the same FID code as evaluate.py, on the validation split
        from imagetok.evaluation.callback import ValidationFID

        extra_callbacks.append(ValidationFID(str(cfg.val_fid.feature_layer), cfg.val_fid.inception_weights,
                                             cfg.val_fid.random_weights))
    checkpoints = StepCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
                                  every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
                                  monitor="step", mode="max", save_top_k=cfg.checkpoint.keep,
                                  enable_version_counter=False)  # one last.ckpt, also after a resume
    if rank_zero_only.rank == 0:
        for stale in remove_stale_temporaries(run_dir / "checkpoints"):  # a killed write's leftovers
            log.info("removed %s, left by an interrupted checkpoint write", stale)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("compile", None)  # imagetok's, not a Lightning Trainer argument (see build)
    if trainer_args.get("strategy") == "fsdp":  # Lightning's own FSDPStrategy would wrap the module as a whole
        trainer_args["strategy"] = ShardedGeneratorDiscriminatorStrategy()
    elif wants_ddp(trainer_args.get("strategy", "auto"), trainer_args.get("devices", "auto"),
                   trainer_args.get("num_nodes", 1), trainer_args.get("accelerator", "auto")):
        trainer_args["strategy"] = GeneratorDiscriminatorDDPStrategy()
    trainer = L.Trainer(**trainer_args, default_root_dir=run_dir,
                        logger=build_loggers(cfg, run_dir, resume_step), plugins=[AtomicCheckpointIO(), *cluster_plugins()],
                        callbacks=[checkpoints, *extra_callbacks, history, ReconstructionImages(run_dir), RandomState(),
                                   *([StepProgressBar()] if trainer_args.get("enable_progress_bar", True) else [])])
    scale_learning_rates(module, cfg, trainer)
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.global_step > 0:  # the final state, also when max_steps is not a multiple of every_n_steps
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:  # step checkpoints of an earlier, killed process count against keep too
        prune_step_checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep)
    summary = history.summary() | {
        "generator_steps": trainer.global_step, "train_seconds": round(time.time() - started, 1),
        "tokenizer_parameters": _count(tok), "discriminator_parameters": _count(module.loss.discriminator),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"), "run_dir": str(run_dir),
        "world_size": trainer.world_size}
    if trainer.world_size > 1:
        differing = module.state_differing_across_ranks
        summary["ranks_in_sync"] = not differing
        if differing:
            log.error("weights or quantizer state differ between ranks after training: %s", ", ".join(differing[:10]))
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", summary)
        first, last = summary["first_validation"], summary["last_validation"]
        if first and last:
            log.info("held-out PSNR: %.2f dB at step %d (first validation) -> %.2f dB at step %d (last); "
                     "codebook usage %.1f%%", first["val/psnr"], first["step"], last["val/psnr"], last["step"],
                     100 * last["val/codebook_usage"])
        elif trainer.global_step > 0:
            log.info("no validation ran: %d steps is fewer than trainer.val_check_interval=%s, so there are no "
                     "held-out figures or reconstructions.png", trainer.global_step, cfg.trainer.val_check_interval)
        written = [summary["checkpoint"], run_dir / "reconstructions.png", run_dir / "metrics.json"]
        log.info("wrote %s", ", ".join(str(p) for p in written if Path(p).is_file()))
    return TrainingRun(summary, module, trainer, datamodule)
