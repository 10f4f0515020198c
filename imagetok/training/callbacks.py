"""Callbacks that leave what a person looks at: reconstruction grids (PNG), a metrics file (JSON), the
progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchvision.utils import make_grid, save_image

from imagetok.training.loggers import log_image


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, min_tile: int = 128) -> torch.Tensor:
    """Originals (top row) above their reconstructions (bottom row); inputs ``[N, 3, H, W]`` in [-1, 1],
    output a ``[3, H', W']`` image in [0, 1]. Small crops are enlarged by an integer factor (nearest
    neighbour, so every pixel stays exact) until a tile is at least ``min_tile`` pixels high."""
    images = torch.cat([originals, reconstructions.clamp(-1, 1)]).float().add(1).div(2)
    scale = max(1, min_tile // images.shape[-2])
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=originals.shape[0], padding=2, pad_value=1.0)


class ReconstructionImages(L.Callback):
    """After every validation, saves ``reconstructions/step_XXXXXX.png`` and ``reconstructions.png``
    (the latest) under ``run_dir``: validation originals above the EMA model's reconstructions. The
    same grid goes to the loggers that take images (TensorBoard, W&B) as ``val/reconstructions``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    @L.pytorch.utilities.rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or pl_module.last_val_batch is None:
            return
        grid = reconstruction_grid(*pl_module.last_val_batch)
        folder = self.run_dir / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"step_{trainer.global_step:06d}.png")
        save_image(grid, self.run_dir / "reconstructions.png")
        log_image(trainer.loggers, "val/reconstructions", grid, trainer.global_step,
                  caption="top: validation images, bottom: reconstructions")


class ValidationHistory(L.Callback):
    """Records ``val/*`` metrics at every validation and writes ``metrics.json`` (atomically) with the
    history plus first and last values; the run adds its summary to the same file at the end."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"step": trainer.global_step}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self.history.append(row)
        if trainer.is_global_zero:
            write_json_atomic(self.path, self.summary())

    def summary(self) -> dict[str, Any]:
        return {"validation": self.history,
                "first_validation": self.history[0] if self.history else None,
                "last_validation": self.history[-1] if self.history else None}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to ``<path>.tmp`` then renames: an interrupted save never corrupts an existing checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting the run's generator steps against ``trainer.max_steps``. A resumed run
    (which Lightning restarts mid-epoch, without calling the epoch-start hook) shows ``51/400`` where the
    stock bar showed ``51/?``; an epoch shorter than the run no longer restarts the count. The loss
    shown beside it is updated every ``trainer.log_every_n_steps`` steps."""

    def _show_run(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.n = trainer.global_step
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.refresh()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._show_run(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._show_run(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            # The loss values are device tensors: read them on logging steps only (and the last), so
            # the other steps do not wait for the GPU.
            if step % max(1, trainer.log_every_n_steps) == 0 or step == bar.total:
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
