"""Sweeps through Hydra's submitit launcher: a real 2-job sweep with the local executor, and the SLURM
launcher config down to the sbatch header it would submit (with ``srun`` faked; nothing is submitted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from conftest import CONFIGS, ROOT
from imagetok.errors import ConfigValueError
from imagetok.training.checks import resolve_resume
from imagetok.training.cluster import check_sweep_job, cluster_plugins, requeued_by_slurm, resume_setting
from imagetok.training.strategy import device_count, wants_ddp
from test_train_variants import SAMPLE, TINY


def test_local_submitit_sweep_runs_each_job_in_its_own_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = [*TINY, *SAMPLE, "trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint.every_n_steps=2",
                 "loss.disc_start=1", "optim.lr=1e-3,2e-3"]
    env = dict(os.environ, IMAGETOK_OFFLINE="1")
    # The console script, as an installed package runs it: the same overrides and -m sweeps as train.py.
    command = [os.path.join(os.path.dirname(sys.executable), "imagetok-train"), "-m", "hydra/launcher=submitit_local", *overrides,
               f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for job, lr in [("0", 1e-3), ("1", 2e-3)]:
        run_dir = sweep_dir / job
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["generator_steps"] == 2 and summary["run_dir"] == str(run_dir)
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["hyper_parameters"]["config"]["optim"]["lr"] == lr
        assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(lr)  # what it trained with
        assert (run_dir / "logs" / "metrics.csv").is_file()  # one logger run per job
        log = (run_dir / "train.log").read_text()
        assert f"lr {lr:.3g} -> {lr:.3g}" in log and log.count("global batch") == 1
    assert len(list((sweep_dir / ".submitit").glob("*/*_0_result.pkl"))) == 2  # submitted as two jobs


def slurm_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment srun gives one task of a 2 nodes x 8 tasks job."""
    for name, value in [("SLURM_NTASKS", "16"), ("SLURM_NTASKS_PER_NODE", "8"), ("SLURM_JOB_NAME", "train"),
                        ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_NODEID", "0")]:
        monkeypatch.setenv(name, value)


def test_local_sweep_refuses_several_devices(compose_config, monkeypatch):
    cfg = compose_config(["trainer.devices=2"])
    with pytest.raises(ConfigValueError) as err:
        check_sweep_job(cfg.trainer)
    assert err.value.key == "trainer.devices"
    message = str(err.value)
    assert "1 in a sweep (-m) run on this machine" in message and "re-run the whole sweep" in message
    assert "hydra/launcher=slurm" in message
    with pytest.raises(ConfigValueError):
        check_sweep_job(compose_config(["trainer.devices=2", "trainer.strategy=fsdp"]).trainer)
    with pytest.raises(ConfigValueError):  # two GPU indices
        check_sweep_job(compose_config(["trainer.accelerator=gpu", "trainer.devices='0,1'"]).trainer)
    check_sweep_job(compose_config([]).trainer)  # one device is fine
    # under srun every task is one rank already, so the same job is fine on SLURM
    slurm_task(monkeypatch)
    check_sweep_job(cfg.trainer)


def test_lightning_never_requeues_on_slurm(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert cluster_plugins() == [] and not requeued_by_slurm()
    slurm_task(monkeypatch)  # srun in a plain sbatch job
    [plugin] = cluster_plugins()
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # srun under submitit
    [plugin] = cluster_plugins()
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a requeued job
    assert requeued_by_slurm()


def test_a_requeued_job_resumes_from_its_own_checkpoint_first(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run_dir, outputs = str(tmp_path / "outputs" / "run"), str(tmp_path / "outputs")
    assert resume_setting(None, outputs, run_dir, sweep=False) == (None, outputs)
    assert resume_setting(None, outputs, run_dir, sweep=True) == (None, outputs)
    assert resume_setting("last", outputs, run_dir, sweep=True) == ("last", run_dir)  # a sweep job: its own dir only
    assert resume_setting("last", outputs, run_dir, sweep=False) == ("last", outputs)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_setting(None, outputs, run_dir, sweep=False) == ("last", outputs)  # plain sbatch: a single run
    assert resume_setting(None, outputs, run_dir, sweep=True) == ("last", run_dir)
    assert resume_setting("a.ckpt", outputs, run_dir, sweep=False) == ("a.ckpt", outputs)  # an explicit path stays

    # resume=last then prefers the run's own last.ckpt (a fixed hydra.run.dir), even over a newer one
    # elsewhere under resume_search_dir (a timestamped run dir's earlier attempt is found there)
    own, other = tmp_path / "outputs" / "run" / "checkpoints", tmp_path / "outputs" / "2024-01-01" / "checkpoints"
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(b"")
    resume, search = resume_setting(None, outputs, run_dir, sweep=False)
    assert resolve_resume(resume, tmp_path / "outputs" / "run", tmp_path / search) == str(other / "last.ckpt")
    own.mkdir(parents=True)
    (own / "last.ckpt").write_bytes(b"")
    os.utime(own / "last.ckpt", (1, 1))  # older
    assert resolve_resume(resume, tmp_path / "outputs" / "run", tmp_path / search) == str(own / "last.ckpt")


@pytest.mark.parametrize("devices,accelerator,count", [
    (1, "auto", 1), (2, "cpu", 2), ("2", "gpu", 2), ([0, 1], "gpu", 2), ([3], "gpu", 1), ("0,1", "gpu", 2),
    ("3,", "gpu", 1), (" 1, 2 ,3", "gpu", 3), ("auto", "cpu", 1), (-1, "cpu", 1),
    ("auto", "gpu", max(1, torch.cuda.device_count())), ("-1", "auto", max(1, torch.cuda.device_count())),
])
def test_device_count_reads_every_form_of_trainer_devices(devices, accelerator, count):
    assert device_count(devices, accelerator) == count
    assert wants_ddp("auto", devices, 1, accelerator) == (count > 1)
    assert wants_ddp("auto", devices, 2, accelerator)  # two nodes are always data-parallel


def test_slurm_launcher_config_builds_the_sbatch_header(tmp_path, monkeypatch):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp", "trainer.num_nodes=2",
                     "trainer.devices=8", f"hydra.sweep.dir={tmp_path}"]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith("SlurmLauncher")
    # one task per GPU, from the trainer's own settings (Lightning checks both against SLURM's)
    assert (launcher_cfg.nodes, launcher_cfg.tasks_per_node, launcher_cfg.gpus_per_node) == (2, 8, 8)
    assert launcher_cfg.max_num_timeout > 0 and launcher_cfg.signal_delay_s > 0
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder").startswith(str(tmp_path))

    # Run the launcher's own launch() up to the submission, with a fake srun on PATH (submitit looks for
    # it) and map_array stopped before it calls sbatch.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    submitted = {}

    class Stop(Exception):
        pass

    def map_array(self, fn, *args):
        submitted["sbatch"] = self._executor._make_submission_file_text("srun python -m submitit.core._submit", "uid")
        submitted["max_num_timeout"] = self._executor.max_num_timeout
        raise Stop

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Stop):
        launcher.launch([["optim.lr=1e-4"], ["optim.lr=2e-4"]], initial_job_idx=0)
    header = submitted["sbatch"]
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--cpus-per-task=10",
                 "--time=1440", "--signal=USR2@300"]:
        assert f"#SBATCH {line}\n" in header, header
    assert submitted["max_num_timeout"] == launcher_cfg.max_num_timeout
