"""Lightning loggers built from the ``logger`` config group (CSV, TensorBoard, Weights & Biases).

``cfg.logger`` maps a name to a ``_target_`` node, one per selected option (``logger=csv``,
``logger=[csv,wandb]``; ``~logger`` for none). Every logger writes under the run directory, and
Lightning's loggers only create their run and write on global rank 0, so a DDP job is one logger run.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import netrc
import os
from pathlib import Path
from typing import Any
import warnings
from urllib.parse import urlparse

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from imagetok.errors import ConfigValueError

log = logging.getLogger(__name__)


def wandb_credentials_found() -> bool:
    """Whether ``wandb`` could log in without asking: an API key (or identity token) in the environment,
    or a ``wandb login`` entry in ~/.netrc for the configured host. Nothing is sent anywhere."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with three choices made for tokenizer runs:

    - ``offline=None`` (the config's default) logs online only when credentials exist (see
      :func:`wandb_credentials_found`) and ``WANDB_MODE`` is unset; otherwise offline, into
      ``<save_dir>/wandb/offline-run-*`` (upload later with ``wandb sync``).
    - ``id=None`` derives the run id from ``save_dir``: resuming or requeueing a job in its own run
      directory continues the same W&B run instead of starting another one.
    - ``finalize`` finishes the run, so a second job in the same process (Hydra multirun, tests) gets its
      own run instead of silently reusing the first.
    """

    def __init__(self, save_dir: str, offline: bool | None = None, id: str | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not wandb_credentials_found()
            if offline and rank_zero_only.rank == 0:
                log.info("W&B: no credentials found (WANDB_API_KEY or `wandb login`), logging offline to %s/wandb; "
                         "upload later with `wandb sync %s/wandb/offline-run-*`", save_dir, save_dir)
        if id is None:
            id = hashlib.sha1(str(Path(save_dir).resolve()).encode()).hexdigest()[:16]
        super().__init__(save_dir=save_dir, offline=offline, id=id, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb 0.31 warns about the key even when it is None
            del self._wandb_init["anonymous"]

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and rank_zero_only.rank == 0:
            self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)
            self._experiment = None


def continue_logs(logger: Logger, step: int) -> None:
    """Make a resumed run's logger append to what the killed or finished run wrote, from generator step
    ``step`` on: the CSV keeps its rows of earlier steps (Lightning's CSV writer would delete the file),
    TensorBoard purges events of later steps, which the resumed run logs again. W&B continues its run id
    (see :class:`WandbLogger`). Call before anything is logged."""
    if isinstance(logger, CSVLogger) and rank_zero_only.rank == 0:
        path = Path(logger.log_dir) / _ExperimentWriter.NAME_METRICS_FILE
        kept, header = [], []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                # A row's step is the number of generator steps taken before it was logged.
                kept = [row for row in reader if row.get("step", "").isdigit() and int(row["step"]) < step]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted")
            writer = logger.experiment  # creates the writer, which removes the file: written back below
        if header:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(kept)
            os.replace(tmp, path)
            writer.metrics_keys = header
    elif isinstance(logger, TensorBoardLogger):
        logger._kwargs["purge_step"] = step  # passed to SummaryWriter when the experiment is created


def build_loggers(cfg: DictConfig, run_dir: str | Path, resume_step: int | None = None) -> list[Logger]:
    """The loggers ``cfg.logger`` selects, each writing under ``run_dir`` unless its node sets
    ``save_dir``; the resolved run config is logged as their hyperparameters (rank 0 only). A run resumed
    from generator step ``resume_step`` appends to the logs already there (:func:`continue_logs`)."""
    selected = cfg.get("logger") or {}
    loggers: list[Logger] = []
    for name, node in selected.items():
        if node is None:  # logger.<name>=null switches one logger of a list off
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigValueError(f"logger.{name}", OmegaConf.to_container(node) if isinstance(node, DictConfig) else node,
                                   "a node with a _target_ Lightning logger class (see configs/logger/)")
        save_dir = {} if node.get("save_dir") else {"save_dir": str(run_dir)}
        try:
            logger = instantiate(node, _convert_="all", **save_dir)
        except InstantiationException as err:
            raise ConfigValueError(f"logger.{name}", node.get("_target_"), f"a buildable logger ({err.__cause__ or err})") from None
        if not isinstance(logger, Logger):
            raise ConfigValueError(f"logger.{name}._target_", node._target_, "a lightning.pytorch.loggers.Logger subclass")
        if resume_step is not None:
            continue_logs(logger, resume_step)
        loggers.append(logger)
    if loggers and rank_zero_only.rank == 0:  # the loggers' own methods are rank-zero-only too
        hyperparameters = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(hyperparameters)
    return loggers


@rank_zero_only
def log_image(loggers: list[Logger], key: str, image: torch.Tensor, step: int, caption: str | None = None) -> None:
    """Send one image ``[3, H, W]`` in [0, 1] to every logger that takes images (TensorBoard, W&B);
    the others (CSV) are skipped. Called on global rank 0 only."""
    pixels = image.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)  # W&B casts floats without scaling
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, pixels, global_step=step)
        elif isinstance(logger, LightningWandbLogger):
            logger.log_image(key, [pixels], step=step, **({"caption": [caption]} if caption else {}))
