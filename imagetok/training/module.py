"""LightningModule that trains a :class:`Tokenizer` against a discriminator with manual optimisation.

One batch = one generator step (then one discriminator step once it has started). ``global_step``
counts generator steps only: the discriminator is stepped through the strategy directly, which keeps
precision plugins working but does not advance Lightning's step counter.

A non-finite loss term or gradient norm either stops the run (``stop``, the default) or drops that
batch's update (``skip``): no optimiser, scheduler or EMA step, and the state the forward passes wrote
in place put back (the quantizer's buffers and codebook, the discriminator's running statistics), at
most ``optim.max_skipped_steps`` times. All ranks take the same decision. A checkpoint is never
written from non-finite weights. ``stop`` reads its checks one step late, so that a step has no host
synchronisation (training/nonfinite.py); ``skip`` reads one flag per network per step.

The learning rates are the configured ones (after ``optim.lr_scaling``) also after a resume: the
checkpoint's rates give way to them at the step the run has reached (:meth:`on_train_start`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.profiler import record_function
from torch.distributed.tensor import DTensor
from torchmetrics.image import PeakSignalNoiseRatio

from imagetok.evaluation.codebook import CodebookUsage
from imagetok.losses.vqgan import VQGANLoss
from imagetok.tokenizer import Tokenizer
from imagetok.training import performance
from imagetok.training.ema import EMA
from imagetok.training.nonfinite import DeferredFiniteChecks, all_ranks_min, nonfinite_names
from imagetok.training.rank_sync import unsynced_state
from imagetok.training.schedule import lr_lambda
from imagetok.training.strategy import (average_replicated_gradients, clip_gradient_norm, gradient_norm,
                                        shard_network, shard_tokenizer)

log = logging.getLogger(__name__)


class TokenizerTrainingModule(L.LightningModule):
    """Args:
        tokenizer_config: JSON-able ``{"encoder", "quantizer", "decoder"}`` ``_target_`` dicts.
        loss: the generator/discriminator objective (owns the discriminator).
        optim: ``lr, betas, weight_decay, disc_lr, warmup_steps, schedule, min_lr_ratio, grad_clip``,
            optionally ``nonfinite`` (``stop`` | ``skip``) and ``max_skipped_steps``.
        total_steps: generator steps of the run (end of the cosine schedule).
        ema_decay: decay of the weight EMA used for validation and export; 0 disables it.
        run_config: the resolved run config (primitives only), stored in checkpoints.
        tokenizer: an already built ``Tokenizer.from_config(tokenizer_config)``; built here when None.
        execution: how the networks run (training/performance.py): ``compile`` (false | true | a
            torch.compile backend), ``channels_last`` and ``activation_checkpointing``.
    """

    def __init__(self, tokenizer_config: dict[str, Any], loss: VQGANLoss, optim: dict[str, Any],
                 total_steps: int, ema_decay: float = 0.999, run_config: dict[str, Any] | None = None,
                 tokenizer: Tokenizer | None = None, execution: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Primitives only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"tokenizer_config": tokenizer_config, "config": run_config or {}}, logger=False)
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_config(tokenizer_config)
        self.ema = EMA(self.tokenizer, ema_decay) if ema_decay > 0 else None
        self.loss = loss
        self.optim, self.total_steps = dict(optim), total_steps
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.val_usage = CodebookUsage(self.tokenizer.codebook_sizes)
        self.last_val_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # for the image callback
        # Data-parallel wrappers of the generator and the discriminator, set by
        # GeneratorDiscriminatorDDPStrategy; a plain dict keeps them out of state_dict and .to().
        self._parallel: dict[str, nn.Module] = {}
        self.state_differing_across_ranks: list[str] = []  # set after multi-process training: state that differs by rank
        self.skipped_steps = 0  # batches dropped for a non-finite loss (optim.nonfinite=skip); in checkpoints
        self._sharded = False  # set by configure_model under the FSDP strategy
        self._deferred_checks = DeferredFiniteChecks()  # optim.nonfinite=stop
        self.execution = {"compile": False, "channels_last": "auto", "activation_checkpointing": False,
                          **(execution or {})}
        self._channels_last = False  # set in setup()
        self.frozen_parts: list[nn.Module] = []  # tokenizer parts under `freeze`, kept in eval mode

    def train(self, mode: bool = True) -> "TokenizerTrainingModule":
        """Frozen parts stay in eval mode whatever ``train()`` is asked (Lightning 2.6 restores each
        submodule's own mode after validation), so that no EMA codebook update, k-means or dead-code
        restart moves them."""
        super().train(mode)
        for part in self.frozen_parts:
            part.eval()
        return self

    def wrap_for_data_parallel(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Give the tokenizer and the discriminator a data-parallel wrapper each (see training/strategy.py)."""
        self._parallel = {"tokenizer": wrap(self.tokenizer), "discriminator": wrap(self.loss.discriminator)}

    def unwrap_from_data_parallel(self) -> None:
        self._parallel = {}

    def configure_model(self) -> None:
        """Under ShardedGeneratorDiscriminatorStrategy (``trainer=fsdp``), which sets ``device_mesh``:
        shard the tokenizer, its EMA copy (alike, so that they average shard by shard) and the
        discriminator over the data-parallel ranks. Nothing to do for any other strategy."""
        if self.device_mesh is None or self._sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        units = shard_tokenizer(self.tokenizer, mesh)
        if self.ema is not None:
            shard_tokenizer(self.ema.module, mesh)
        disc_units = shard_network(self.loss.discriminator, mesh)
        self._sharded = True
        replicated = sum(p.numel() for p in self.tokenizer.parameters() if not isinstance(p, DTensor))
        if rank_zero_only.rank == 0:
            log.info("FSDP over %d ranks: tokenizer in %d sharded units, discriminator in %d; %d tokenizer "
                     "parameters replicated (quantizer, decoder's last layer, latent projections)",
                     mesh.size(), units, disc_units, replicated)

    def setup(self, stage: str) -> None:
        """Apply :attr:`execution` once, before Lightning wraps the networks for data parallelism."""
        if stage != "fit" or getattr(self, "_execution_applied", False):
            return
        self._execution_applied = True
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        done = []
        if self.execution["activation_checkpointing"]:
            done.append(f"activation checkpointing of {performance.enable_activation_checkpointing(self.tokenizer)} "
                        "transformer blocks")
        if performance.wants(self.execution["channels_last"], device):
            self._channels_last = True
            performance.channels_last([self.tokenizer, self.loss, *getattr(self.loss, "_perceptual", []),
                                         *([self.ema] if self.ema is not None else [])])
            done.append("channels-last")
        if self.execution["compile"]:
            backend = "inductor" if self.execution["compile"] is True else str(self.execution["compile"])
            networks = {"encoder": self.tokenizer.encoder, "decoder": self.tokenizer.decoder}
            if getattr(self.loss, "r1_weight", 0) > 0:  # R1 differentiates the discriminator twice
                log.info("trainer.compile: the discriminator stays eager (loss.r1_weight > 0 needs its double "
                         "backward, which compiled graphs do not have)")
            else:
                networks["discriminator"] = self.loss.discriminator
            networks.update({"perceptual": p for p in getattr(self.loss, "_perceptual", [])})
            done.append(f"torch.compile ({backend}) of {', '.join(performance.compile_networks(networks, backend))}")
        if done and rank_zero_only.rank == 0:
            log.info("on %s: %s", device, "; ".join(done))

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self._channels_last else images

    @property
    def eval_tokenizer(self) -> Tokenizer:
        """The weights used for validation and export: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.tokenizer

    def _configured_lrs(self) -> tuple[float, float]:
        """The generator's and the discriminator's base learning rates (``optim.lr``, ``optim.disc_lr``
        or ``lr`` when null), as ``run.scale_learning_rates`` left them."""
        return self.optim["lr"], self.optim.get("disc_lr") or self.optim["lr"]

    def configure_optimizers(self):
        o = self.optim
        betas = tuple(o["betas"])
        lr, disc_lr = self._configured_lrs()
        # The loss's generator-side parameters (the REPA projector) train with the tokenizer.
        generator = [p for p in self.tokenizer.parameters() if p.requires_grad] + self._loss_generator_parameters()
        fused = o.get("fused", "auto")
        opt_g = performance.adamw(generator, fused, lr=lr, betas=betas, weight_decay=o["weight_decay"])
        opt_d = performance.adamw(list(self.loss.discriminator.parameters()), fused, lr=disc_lr, betas=betas,
                                  weight_decay=o["weight_decay"])
        # The discriminator's schedule counts its own steps, which begin at loss.disc_start.
        disc_steps = max(1, self.total_steps - getattr(self.loss, "disc_start", 0))
        sched_g = torch.optim.lr_scheduler.LambdaLR(
            opt_g, lr_lambda(o["schedule"], o["warmup_steps"], self.total_steps, o["min_lr_ratio"]))
        sched_d = torch.optim.lr_scheduler.LambdaLR(
            opt_d, lr_lambda(o["schedule"], o["warmup_steps"], disc_steps, o["min_lr_ratio"]))
        return [opt_g, opt_d], [sched_g, sched_d]

    def _loss_generator_parameters(self) -> list[nn.Parameter]:
        return list(getattr(self.loss, "generator_parameters", list)())

    def on_train_start(self) -> None:
        """Put the configured learning rates in place of a checkpoint's.

        On a resume Lightning's ``restore_training_state`` (after ``configure_optimizers``, before the fit
        loop calls this hook) loads each scheduler's ``base_lrs`` and each parameter group's
        ``initial_lr``/``lr`` from the checkpoint, which would silently keep the old ``optim.lr`` or
        ``lr_scaling`` (another global batch). The schedule's position (``last_epoch``: steps taken) is
        the checkpoint's; its rates are this run's. Without a resume this changes nothing.
        """
        changed = []
        for name, optimizer, config, base in zip(("lr", "disc_lr"), self.trainer.optimizers,
                                                 self.trainer.lr_scheduler_configs, self._configured_lrs()):
            scheduler = config.scheduler  # LambdaLR, one lambda per parameter group
            if any(old != base for old in scheduler.base_lrs):
                changed.append(f"{name} {scheduler.base_lrs[0]:.3g} -> {base:.3g}")
            rates = [base * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
            scheduler.base_lrs = [base] * len(rates)
            scheduler._last_lr = list(rates)  # what get_last_lr() reports until its next step()
            for group, rate in zip(optimizer.param_groups, rates):
                group["initial_lr"], group["lr"] = base, rate
        if changed and rank_zero_only.rank == 0:
            log.info("learning rates differ from the checkpoint's: %s; the configured schedule continues from "
                     "generator step %d", ", ".join(changed), self.global_step)

    def _step(self, optimizer, loss: torch.Tensor, count_as_step: bool, name: str, step: int,
              terms: dict[str, torch.Tensor]) -> list[str]:
        """Backward and optimiser step. ``terms``: the loss's logged terms, checked for non-finite values
        with the gradient norm. Returns the non-finite names, and then takes no step, when
        ``optim.nonfinite=skip`` (one flag read, agreed by all ranks); with ``stop`` the check is
        queued for later (:class:`DeferredFiniteChecks`) and the step taken."""
        with self.toggled_optimizer(optimizer):  # the other network's parameters get no gradient
            optimizer.zero_grad(set_to_none=True)
            with record_function(f"imagetok/{name}_backward"):
                self.manual_backward(loss)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if self._sharded:
                average_replicated_gradients(params)
            elif name == "generator" and self._parallel:
                # not inside a DDP wrapper: average by hand so that every rank takes the same step
                average_replicated_gradients(self._loss_generator_parameters())
            max_norm = self.optim.get("grad_clip")
            with record_function("imagetok/nonfinite_check"):
                norm = {f"grad_norm/{name}": gradient_norm(params)} if self._skipping or max_norm else {}
                if self._skipping:
                    bad = self._nonfinite_terms(terms, norm)
                    if bad:
                        optimizer.zero_grad(set_to_none=True)
                        return bad
                else:
                    self._deferred_checks.add(terms)
                    self._deferred_checks.add(norm)
            with record_function(f"imagetok/{name}_optimizer"):
                if max_norm:
                    clip_gradient_norm(params, max_norm, next(iter(norm.values())))
                if count_as_step:
                    optimizer.step()
                else:
                    self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
        return []

    @property
    def _skipping(self) -> bool:
        return self.optim.get("nonfinite", "stop") == "skip"

    def _nonfinite_terms(self, terms: dict[str, torch.Tensor], norm: dict[str, torch.Tensor]) -> list[str]:
        """``optim.nonfinite=skip``: the non-finite names among the loss ``terms`` (or, when they are all
        finite, the gradient ``norm``), decided alike on every rank with one flag read: a rank whose
        own values are finite answers ``["(on another rank)"]``."""
        groups = [g for g in (terms, norm) if g]
        flags = torch.stack([torch.isfinite(torch.stack([torch.as_tensor(v, device=self.device).detach().float()
                                                         .reshape(()) for v in g.values()])).all() for g in groups])
        flags = all_ranks_min(flags.int().to(self.device))
        if all(flags.tolist()):
            return []
        for group in groups:  # values read only when something is wrong
            bad = nonfinite_names(group)
            if bad:
                return bad
        return ["(on another rank)"]

    def _forward_state(self, tokenizer: bool = True) -> dict[str, torch.Tensor]:
        """The state a training forward may change in place: the discriminator's buffers (BatchNorm
        running statistics; the generator loss runs it in train mode too) and, with ``tokenizer``, the
        tokenizer's buffers and the quantizer's parameters (EMA codebook updates, k-means
        initialisation and dead-code restarts write them). The default GroupNorm discriminator has no
        buffers, so only ``loss.discriminator.norm=batch`` adds to the copy; so do LeCAM's anchors and the
        spectral-norm vectors of the DINO discriminator's heads."""
        state = dict(self.loss.named_buffers(prefix="loss"))
        if tokenizer:
            state.update(self.tokenizer.named_buffers(prefix="tokenizer"))
            state.update(self.tokenizer.quantizer.named_parameters(prefix="tokenizer.quantizer"))
        return state

    def _save_forward_state(self, tokenizer: bool = True) -> dict[str, torch.Tensor] | None:
        """A copy of :meth:`_forward_state` to put back if the update is skipped; None unless skipping."""
        if not self._skipping:
            return None
        return {k: t.detach().clone() for k, t in self._forward_state(tokenizer).items()}

    def _skip(self, bad: list[str], step: int, what: str, saved: dict[str, torch.Tensor] | None) -> None:
        """Count a dropped update, put back what the forward pass changed, and give up past the limit."""
        self.skipped_steps += 1
        if saved is not None:
            current = self._forward_state()
            with torch.no_grad():
                for name, tensor in saved.items():
                    current[name].copy_(tensor)
        limit = self.optim.get("max_skipped_steps", 10)
        if self.skipped_steps > limit:
            raise FloatingPointError(f"non-finite loss term(s) {bad} at generator step {step}: {self.skipped_steps} "
                                     f"updates skipped, more than optim.max_skipped_steps={limit}; "
                                     "the last saved checkpoint is untouched")
        if rank_zero_only.rank == 0:
            log.warning("non-finite %s at generator step %d: %s skipped (%d of at most %d)",
                        ", ".join(bad), step, what, self.skipped_steps, limit)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        images = batch  # [B, 3, H, W] in [-1, 1]
        step = self.global_step  # generator steps done so far
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        # The forward pass updates codebook statistics (and, for EMA codebooks, k-means and dead-code
        # restarts, the codebook itself), the generator loss the discriminator's running statistics;
        # a skipped update must not keep them.
        saved = self._save_forward_state()

        with record_function("imagetok/generator_forward"):
            recon, quant = self._parallel.get("tokenizer", self.tokenizer)(self._memory_format(images))
        with record_function("imagetok/generator_loss"):
            g_loss, logs = self.loss.generator_loss(images, recon, quant, step, self.tokenizer.decoder.last_layer)
        bad = self._step(opt_g, g_loss, count_as_step=True, name="generator", step=step, terms=logs)
        if bad:
            self._skip(bad, step, "generator and discriminator updates", saved)
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        logs["lr"] = torch.tensor(sched_g.get_last_lr()[0])  # the rate this step used
        sched_g.step()
        if self.ema is not None:
            with record_function("imagetok/ema"):
                self.ema.update(self.tokenizer)

        if self.loss.discriminator_active(step):
            if step == getattr(self.loss, "disc_start", 0):
                # The first discriminator step. An FSDP checkpoint saved before it "initialised" the unused
                # optimiser with a zero-lr step (torch's get_optimizer_state_dict): Adam must count from 0.
                opt_d.optimizer.state.clear()
            saved_d = self._save_forward_state(tokenizer=False)  # its forward passes on real and fake
            with record_function("imagetok/discriminator_loss"):
                d_loss, d_logs = self.loss.discriminator_loss(self._memory_format(images), recon.detach(),
                                                              self._parallel.get("discriminator"), step=step)
            bad = self._step(opt_d, d_loss, count_as_step=False, name="discriminator", step=step, terms=d_logs)
            if not bad:
                logs["disc_lr"] = torch.tensor(sched_d.get_last_lr()[0])
                sched_d.step()
                logs.update(d_logs)
            else:
                self._skip(bad, step, "discriminator update", saved_d)

        # stop: this step's checks are queued, the previous step's read (its GPU work is done by now)
        self._deferred_checks.end_step(step, self.device)
        self._deferred_checks.raise_if_nonfinite(before_step=step)
        logs.update({f"quantizer/{k}": v for k, v in quant.metrics.items()})
        logs["skipped_steps"] = torch.tensor(float(self.skipped_steps))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        self.log("loss", logs["total"], prog_bar=True, logger=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._deferred_checks.raise_if_nonfinite()  # a non-finite step is never checkpointed
        # Checked on this rank's own tensors (its shards when sharded), and agreed on by all ranks: under
        # FSDP only rank 0 holds the assembled state_dict, and every rank must stop alike.
        state = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in self.state_dict().items()}
        state = {k: v for k, v in state.items() if v.is_floating_point()}
        finite = torch.stack([torch.isfinite(v).all() for v in state.values()] or [torch.tensor(True)])
        if not all_ranks_min(finite.all().reshape(1).int().to(self.device)).item():
            bad = [k for k, ok in zip(state, finite.tolist()) if not ok] or ["(on another rank)"]
            raise FloatingPointError(f"non-finite weights {bad[:5]} at generator step {self.global_step}: checkpoint "
                                     "not written, the last saved checkpoint is untouched")
        checkpoint["skipped_steps"] = self.skipped_steps
        if self._channels_last and "state_dict" in checkpoint:
            checkpoint["state_dict"] = performance.contiguous_state(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        recon, quant = self.eval_tokenizer(self._memory_format(batch))
        # Metrics see what a saved PNG would hold: both sides rounded to uint8.
        target = Tokenizer.to_uint8(batch).float() / 255
        output = Tokenizer.to_uint8(recon).float() / 255
        self.val_psnr.update(output, target)
        self.val_usage.update(quant.indices)
        if batch_idx == 0:
            self.last_val_batch = (batch[:8].detach().cpu(), recon[:8].detach().cpu())
        return {"reconstruction": recon.detach()}  # for validation callbacks (val/fid)

    def on_validation_epoch_start(self) -> None:
        self._deferred_checks.raise_if_nonfinite()  # validate no weights from a non-finite step

    def on_train_end(self) -> None:
        self._deferred_checks.raise_if_nonfinite()
        if self.trainer.world_size > 1:  # sharded tensors exist once; the replicated state is compared
            self.state_differing_across_ranks = unsynced_state(_ReplicatedState(self), self.all_gather)

    def on_validation_epoch_end(self) -> None:
        # compute() already sums the metric states over ranks; sync_dist then averages equal values
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True, sync_dist=True)
        self.log("val/codebook_usage", self.val_usage.compute(), prog_bar=True, sync_dist=True)
        self.val_psnr.reset()
        self.val_usage.reset()


class _ReplicatedState:
    """The part of a module's state_dict that every rank holds whole (all of it unless sharded)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.module.state_dict().items() if not isinstance(v, DTensor)}
