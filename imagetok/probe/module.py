"""``ProbeModule``: the Lightning loop around :class:`~imagetok.probe.gpt.ProbeGPT` (next-token
cross-entropy, AdamW with warm-up and cosine decay) and the held-out NLL of every validation."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from imagetok.probe.gpt import ProbeGPT
from imagetok.probe.layout import TokenLayout
from imagetok.quantizers._utils import all_reduce_sum
from imagetok.training.schedule import lr_lambda


class ProbeModule(L.LightningModule):
    """Trains the probe on batches ``{"tokens": [B, *token_shape], "labels": [B]}`` (labels optional).

    Args:
        layout: :meth:`TokenLayout.to_dict` of the shards.
        model: ``ProbeGPT`` keyword arguments (``width``, ``depth``, ``num_heads``, ``mlp_ratio``).
        subtokens: ``factorized`` | ``flattened``.
        num_classes: classes of the class token (None: unconditional).
        class_dropout: fraction of training sequences given the null class instead of their own (0..1).
        optim: ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``, ``schedule``, ``min_lr_ratio``.
        total_steps: the schedule's length (``trainer.max_steps``).
        run_config: the resolved run config, stored in checkpoints.

    The loss is the mean NLL per position (summed over its ``K`` sub-tokens), in nats. ``curve`` holds
    ``(step, nll)`` of training (every logging step) and validation, for the loss plot; it travels in
    checkpoints, so a resumed run's plot is whole.
    """

    def __init__(self, *, layout: dict[str, Any], model: dict[str, Any], subtokens: str, num_classes: int | None,
                 class_dropout: float, optim: dict[str, Any], total_steps: int, run_config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layout = TokenLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in layout.items()})
        self.model = ProbeGPT(codebook_sizes=list(self.layout.codebook_sizes), positions=self.layout.positions,
                              subtokens=subtokens, num_classes=num_classes, **model)
        self.num_classes, self.class_dropout, self.optim, self.total_steps = num_classes, class_dropout, optim, total_steps
        self.curve: dict[str, list[list[float]]] = {"train": [], "val": []}
        self.last_validation: dict[str, Any] | None = None
        self._val_sum: torch.Tensor | None = None

    def start_ids(self, batch: dict[str, torch.Tensor], train: bool) -> torch.Tensor:
        """Start-token ids ``[B]``: the class labels when conditioned (during training each replaced by
        the null class with probability ``class_dropout``), else the one unconditional start token."""
        tokens = batch["tokens"]
        if not self.num_classes:
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        labels = batch["labels"]
        if train and self.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout
            labels = labels.masked_fill(drop, self.model.null_class)
        return labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll = self.model.nll(self.layout.to_sequence(batch["tokens"]), self.start_ids(batch, train=True))
        loss = nll.sum(-1).mean()
        self.log("train/nll", loss, prog_bar=True)
        every = max(1, self.trainer.log_every_n_steps)
        if (self.global_step + 1) % every == 0 or self.global_step == 0:  # a read of the loss on logging steps only
            self.curve["train"].append([self.global_step + 1, float(loss.detach())])
        return loss

    def on_validation_epoch_start(self) -> None:
        # per sub-codebook NLL sums and the number of positions: summed over ranks at the end
        self._val_sum = torch.zeros(self.layout.subtokens + 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll = self.model.nll(self.layout.to_sequence(batch["tokens"]), self.start_ids(batch, train=False))
        self._val_sum[:-1] += nll.double().sum((0, 1))
        self._val_sum[-1] += nll.shape[0] * nll.shape[1]

    def on_validation_epoch_end(self) -> None:
        totals = all_reduce_sum(self._val_sum)
        per_subcodebook = (totals[:-1] / totals[-1].clamp_min(1)).tolist()  # nats per position, each sub-codebook
        nats = sum(per_subcodebook)
        self.log("val/nll", nats, prog_bar=True, sync_dist=False)
        self.log("val/bits_per_position", nats / math.log(2))
        if not self.trainer.sanity_checking:
            self.last_validation = {"step": self.global_step, "nll_nats_per_subcodebook": per_subcodebook}
            self.curve["val"] = [row for row in self.curve["val"] if row[0] != self.global_step]
            self.curve["val"].append([self.global_step, nats])

    def configure_optimizers(self):
        o = self.optim
        # weight decay on matrices (linear weights, embeddings, positions), none on norms and biases
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=o["lr"], betas=tuple(o["betas"]))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o["schedule"], o["warmup_steps"], self.total_steps, o["min_lr_ratio"]))
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["probe_curve"] = self.curve

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.curve = checkpoint.get("probe_curve", {"train": [], "val": []})
