"""Checks that need more than one config key, run before anything is built; each failure names the
key and the values it would accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from imagetok.errors import CheckpointError, ConfigValueError, check
from imagetok.training.resume import step_checkpoints

# bf16-true / 64-true would cast the quantizer's float32 statistics and projections away from float32.
SUPPORTED_PRECISIONS = ("32-true", "32", "bf16-mixed")
WEBDATASET = "imagetok.data.webdataset.WebDataModule"  # data=webdataset


def validate_config(cfg: DictConfig) -> None:
    if "patch_size" in cfg.encoder:  # ViT-style encoders downsample by their patch size
        factor, why = cfg.encoder.patch_size, f"encoder.patch_size={cfg.encoder.patch_size}"
    else:
        ch_mult = list(cfg.encoder.get("ch_mult", [1]))
        factor, why = 2 ** (len(ch_mult) - 1), f"2**(len(encoder.ch_mult)-1) with encoder.ch_mult={ch_mult}"
    size = cfg.data.image_size
    check(isinstance(size, int) and size > 0 and size % factor == 0, "data.image_size", size,
          f"a multiple of the encoder's downsampling factor {factor} ({why}), "
          f"e.g. {max(factor, (size // factor) * factor) if isinstance(size, int) else factor}")
    max_steps = cfg.trainer.get("max_steps", -1)
    check(isinstance(max_steps, int) and max_steps >= 1, "trainer.max_steps", max_steps, "an integer >= 1")
    precision = str(cfg.trainer.get("precision", "32-true"))
    check(precision in SUPPORTED_PRECISIONS, "trainer.precision", precision,
          f"one of {SUPPORTED_PRECISIONS} (fp16 GAN training is unstable; use bf16-mixed on GPUs)")
    if cfg.trainer.get("strategy") == "fsdp":  # FSDP2 leaves buffers alone: running statistics would drift by rank
        norm = cfg.loss.discriminator.get("norm", "group")
        check(norm != "batch", "loss.discriminator.norm", norm, "'group' or 'none' with trainer.strategy=fsdp")
        # Not tried yet under FSDP: spectral-norm parametrisations in the DINO heads, the REPA projector
        # outside the sharded networks, and R1's double backward through sharded weights.
        disc = cfg.loss.discriminator.get("_target_", "")
        check(not disc.endswith("DINODiscriminator"), "loss/discriminator", "dino",
              "patchgan with trainer.strategy=fsdp (use trainer=ddp for the DINO discriminator)")
        check(cfg.loss.get("repa") is None, "loss.repa", "set", "null with trainer.strategy=fsdp (use trainer=ddp)")
        check(not cfg.loss.get("r1_weight"), "loss.r1_weight", cfg.loss.get("r1_weight"), "0 with trainer.strategy=fsdp")
        # Each rank validates on its own shards, so ranks run different numbers of validation batches;
        # under FSDP every forward of the (sharded) EMA copy all-gathers its weights, and a rank that
        # has finished waits in the next collective for batches that never come: a deadlock.
        check(cfg.data.get("_target_") != WEBDATASET, "trainer.strategy", "fsdp",
              "'ddp' (trainer=ddp) or 'auto' with data=webdataset: its ranks validate on unequal numbers of "
              "batches, and under FSDP each validation forward all-gathers the sharded EMA weights, so the "
              "ranks would wait on each other forever; or keep trainer=fsdp with data=imagefolder")
    compiled = cfg.trainer.get("compile", False)
    check(isinstance(compiled, (bool, str)) and compiled not in ("", "true", "false"), "trainer.compile", compiled,
          "true (inductor), false, or the name of a torch.compile backend (e.g. aot_eager)")
    if compiled and cfg.trainer.get("strategy") == "fsdp":
        check(False, "trainer.compile", compiled, "false with trainer.strategy=fsdp (not tried yet; use trainer=ddp)")
    model = cfg.get("model") or {}
    layout = model.get("channels_last", "auto")
    check(layout in ("auto", True, False), "model.channels_last", layout, "auto (on CUDA), true or false")
    recompute = model.get("activation_checkpointing", False)
    check(isinstance(recompute, bool), "model.activation_checkpointing", recompute, "true or false")
    fused = cfg.optim.get("fused", "auto")
    check(fused in ("auto", True, False), "optim.fused", fused, "auto (fused AdamW on CUDA), true or false")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    check(accumulate == 1, "trainer.accumulate_grad_batches", accumulate,
          "1: imagetok optimises manually (a generator and a discriminator step per batch), which Lightning "
          "cannot accumulate; for a larger global batch raise data.batch_size or use more devices")
    o = cfg.optim
    check(o.lr > 0, "optim.lr", o.lr, "a float > 0")
    check(o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "'cosine' or 'constant'")
    check(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "a float in [0, 1]")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two floats in [0, 1)")
    check(0 <= cfg.ema_decay < 1, "ema_decay", cfg.ema_decay, "a float in [0, 1) (0 disables the EMA)")
    nonfinite = o.get("nonfinite", "stop")
    check(nonfinite in ("stop", "skip"), "optim.nonfinite", nonfinite, "'stop' or 'skip'")
    skips = o.get("max_skipped_steps", 10)
    check(isinstance(skips, int) and skips >= 0, "optim.max_skipped_steps", skips, "an integer >= 0")
    rule = o.get("lr_scaling", "none")
    check(rule in ("none", "linear", "sqrt"), "optim.lr_scaling", rule, "'none', 'linear' or 'sqrt'")
    base = o.get("base_batch_size")
    if rule != "none":
        check(isinstance(base, int) and base >= 1, "optim.base_batch_size", base,
              f"the global batch size (an integer >= 1) that optim.lr was set for, needed by optim.lr_scaling={rule}")


def resolve_resume(resume: str | None, run_dir: Path, search_root: Path) -> str | None:
    """``null`` -> None; ``last`` -> this run's ``last.ckpt`` (or its newest step checkpoint), else the
    newest ``last.ckpt`` under ``search_root``
    (None if there is none: a fresh start); a path -> that file, which must exist."""
    if resume in (None, "", "null"):
        return None
    if resume == "last":
        own = run_dir / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        steps = step_checkpoints(own.parent)
        if steps:  # killed between a step checkpoint and its last.ckpt copy
            return str(steps[-1])
        found = sorted(search_root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) if search_root.is_dir() else []
        return str(found[-1]) if found else None
    if not Path(resume).is_file():
        raise ConfigValueError("resume", resume, "null, 'last', or the path of an existing .ckpt file")
    return str(resume)


def check_resume_checkpoint(path: str) -> tuple[dict[str, Any], int]:
    """The run config saved in the checkpoint to resume from, and its generator step; fails in one line
    (:class:`CheckpointError`) before training when that file is truncated, not a torch file, or not an
    imagetok training checkpoint."""
    from imagetok.export.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("hyper_parameters") or {}
    if "tokenizer_config" not in saved:
        raise CheckpointError(f"{path} is not an imagetok training checkpoint (no hyper_parameters.tokenizer_config)")
    return saved.get("config") or {}, int(checkpoint.get("global_step", 0))
