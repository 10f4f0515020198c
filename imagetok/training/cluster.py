"""Who starts the training processes, and what follows for each of them.

On one machine Lightning's DDP launcher re-runs ``train.py`` once per extra device, in the job's own run
directory. On SLURM, Hydra's submitit launcher submits one job per sweep point (or a plain ``sbatch``
script runs ``srun python train.py ...``) and ``srun`` starts one task per device on every node;
Lightning's ``SLURMEnvironment`` then reads the ranks from ``SLURM_*`` variables and starts nothing
itself. Either way a job has one run directory, written by every rank, and only global rank 0 writes its
metrics, logs and images.

A requeued SLURM job (preempted, or timed out under submitit) continues from its ``last.ckpt``: one
mechanism for every way of submitting, see :func:`cluster_plugins` and :func:`resume_setting`.
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
    or a timeout, SLURM itself after a preemption or node failure (``sbatch --requeue``), and SLURM
    then counts the restarts in ``SLURM_RESTART_COUNT``."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def cluster_plugins() -> list[Any]:
    """Trainer plugins for the cluster this process runs on (none off SLURM).

    On SLURM, Lightning's own auto-requeue (on SIGUSR1: save ``hpc_ckpt_*.ckpt`` into the run directory,
    then ``scontrol requeue``) is turned off, under submitit and plain ``sbatch`` alike. Its checkpoint
    lands in the job's run directory, which a requeued single run does not find again (Hydra's default
    ``hydra.run.dir`` is timestamped), and it is a second mechanism beside the one imagetok uses: the
    requeued job resumes from ``checkpoints/last.ckpt`` (:func:`resume_setting`). Submitit requeues a
    job before its time limit (USR2); a plain ``sbatch`` job is requeued by SLURM on preemption with
    ``--requeue``, and continues from the last periodic checkpoint (``checkpoint.every_n_steps``).
    """
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def resume_setting(resume: str | None, resume_search_dir: str, run_dir: str, sweep: bool) -> tuple[str | None, str]:
    """``(resume, resume_search_dir)`` for this job, from the configured ones.

    A job that SLURM requeued reruns its original command line, so ``resume=null`` becomes ``last``:
    it must not start over. ``last`` looks in the run's own directory first (a fixed ``hydra.run.dir``,
    e.g. one named after ``SLURM_JOB_ID``, continues exactly there), then, in a single run, for the
    newest ``last.ckpt`` under ``resume_search_dir`` (where a timestamped run dir's previous attempt
    is). A sweep job (``sweep``) searches nothing but its own directory: the newest checkpoint of the
    sweep would belong to another job.
    """
    if resume is None and requeued_by_slurm():
        resume = "last"
    if sweep and resume == "last":
        resume_search_dir = run_dir
    return resume, resume_search_dir


def check_sweep_job(trainer: Any) -> None:
    """A sweep job (``-m``) may use several devices only if the cluster starts its processes.

    Lightning's launcher (DDP or FSDP) re-runs the command line for every extra rank, and in a sweep that
    command line is the whole sweep (Hydra issue 2070), so each rank would start sweeps of its own.
    """
    strategy, devices = trainer.get("strategy", "auto"), trainer.get("devices", "auto")
    num_nodes, accelerator = trainer.get("num_nodes", 1), trainer.get("accelerator", "auto")
    several = (wants_ddp(strategy, devices, num_nodes, accelerator)
               or (strategy == "fsdp" and wants_ddp("auto", devices, num_nodes, accelerator)))
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


def prepare_job(cfg, hydra_cfg) -> bool:
    """What every training-like entry point does first under Hydra (train.py, probe.py): a sweep job's
    trainer is checked, and ``cfg.resume`` / ``cfg.resume_search_dir`` are set for this job (a job that
    SLURM requeued continues from its last checkpoint; see :func:`resume_setting`). Returns whether the
    run resumes."""
    import logging
    import os

    from hydra.types import RunMode

    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if sweep:
        check_sweep_job(cfg.trainer)
    resume, search_dir = resume_setting(cfg.resume, cfg.resume_search_dir, hydra_cfg.runtime.output_dir, sweep)
    if resume != cfg.resume:
        logging.getLogger("imagetok").info("requeued by SLURM (restart %s): resume=last",
                                           os.environ.get("SLURM_RESTART_COUNT"))
    cfg.resume, cfg.resume_search_dir = resume, search_dir
    return bool(resume)
