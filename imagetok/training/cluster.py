"""Who starts the training processes, and what follows for each of them.

On one machine Lightning's DDP launcher re-runs ``train.py`` once per extra device, in the job's own run
directory. On SLURM, Hydra's submitit launcher submits one job per sweep point and ``srun`` starts one
task per device on every node; Lightning's ``SLURMEnvironment`` then reads the ranks from ``SLURM_*``
variables and starts nothing itself. Either way a job has one run directory, written by every rank, and
only global rank 0 writes its metrics, logs and images.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_only

from imagetok.errors import ConfigValueError
from imagetok.training.strategy import wants_ddp


def processes_started_by_cluster() -> bool:
    """Whether ``srun`` (SLURM) or ``torchrun`` started this process as one rank of the job."""
    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def requeued_by_slurm() -> bool:
    """Whether SLURM restarted this job: submitit requeues it (``scontrol requeue``) after a preemption
    or a timeout, and SLURM then counts the restarts in ``SLURM_RESTART_COUNT``."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def cluster_plugins() -> list[Any]:
    """Trainer plugins for the cluster this process runs on (none off SLURM).

    Under submitit, submitit alone requeues a timed-out or preempted job: it sends USR2 before the time
    limit and resubmits the same job, which resumes from its own ``last.ckpt`` (``resume=last``).
    Lightning's own SLURM auto-requeue (SIGUSR1, ``hpc_ckpt_*.ckpt``, ``scontrol requeue``) would be a
    second mechanism saving elsewhere, so it is turned off there.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def check_sweep_job(trainer: Any) -> None:
    """A sweep job (``-m``) may use several devices only if the cluster starts its processes.

    Lightning's launcher (DDP or FSDP) re-runs the command line for every extra rank, and in a sweep that
    command line is the whole sweep (Hydra issue 2070), so each rank would start sweeps of its own.
    """
    strategy, devices = trainer.get("strategy", "auto"), trainer.get("devices", "auto")
    num_nodes = trainer.get("num_nodes", 1)
    several = wants_ddp(strategy, devices, num_nodes) or (strategy == "fsdp" and wants_ddp("auto", devices, num_nodes))
    if several and not processes_started_by_cluster():
        raise ConfigValueError(
            "trainer.devices", devices,
            "1 in a sweep (-m) run on this machine: Lightning's process launcher would re-run the whole sweep for "
            "every rank. Sweep with more devices through SLURM (hydra/launcher=slurm starts one task per device), "
            "or run each configuration without -m")


def log_file_on_rank_zero_only() -> None:
    """Drop the Hydra job's log file handler on ranks other than global rank 0, so that a job's
    ``train.log`` holds one copy of each line. Their console output stays (in the terminal locally, in
    submitit's per-task ``.submitit/<job>/*_<rank>_log.err`` files on SLURM)."""
    if rank_zero_only.rank == 0:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
