"""Validation FID during training, computed by the same code as ``evaluate.py``: the FID Inception
(``inception.py``), float64 feature statistics summed over ranks and the Fréchet distance (``fid.py``),
on uint8-rounded validation originals and the EMA model's reconstructions."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from imagetok.evaluation.fid import FeatureStatistics, frechet_distance
from imagetok.evaluation.inception import InceptionFeatures
from imagetok.tokenizer import Tokenizer


class ValidationFID(L.Callback):
    """Logs ``val/fid`` after every validation. The validation split is small, so the covariances are
    usually rank-deficient: the number tracks progress within a run and is not comparable with a
    paper's rFID (use ``evaluate.py`` on 50k images for that).

    Args: as :class:`InceptionFeatures` (``feature_layer``, ``weights_path``, ``random_weights``).
    """

    def __init__(self, feature_layer: str = "2048", weights_path: str | None = None, random_weights: bool = False) -> None:
        self.inception = InceptionFeatures(feature_layer, weights_path, random_weights)  # fails early if weights are missing
        self._real: FeatureStatistics | None = None
        self._fake: FeatureStatistics | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.inception.to(pl_module.device)
        self._real, self._fake = FeatureStatistics(self.inception.dim), FeatureStatistics(self.inception.dim)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: torch.Tensor,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._real.update(self.inception(Tokenizer.to_uint8(batch)))
        self._fake.update(self.inception(Tokenizer.to_uint8(outputs["reconstruction"])))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for stats in (self._real, self._fake):
            stats.sync()  # every rank, outside any rank-0-only code
        fid = frechet_distance(*self._real.mean_and_covariance(), *self._fake.mean_and_covariance())
        pl_module.log("val/fid", torch.tensor(fid, dtype=torch.float32), prog_bar=True)
