"""Shared fixtures: compose the Hydra config tree the way train.py does, with test overrides."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# One thread count for the whole session, subprocesses included, whatever the load: runs that a test
# compares bitwise must not pick different counts (cpu_threads=auto keeps OMP_NUM_THREADS when set).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test downloads weights or sees a developer's torch cache."""
    monkeypatch.setenv("IMAGETOK_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def compose_config() -> Callable[[Sequence[str]], DictConfig]:
    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            return compose("train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def one_thread():
    """One torch thread, for files of tiny models: on 2 shared cores a second thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_recipe(compose_config, tmp_path: Path, overrides: Sequence[str], steps: int):
    """Train a recipe for ``steps`` generator steps; check the run finished with a finite held-out
    PSNR and that ``decode(encode(x))`` equals the eval-mode reconstruction exactly. Returns
    ``(run, tokenizer in eval mode, a validation batch, its tokens)``."""
    from imagetok.training.run import train

    run = train(compose_config(list(overrides)), tmp_path)
    assert run.trainer.global_step == steps and math.isfinite(run.summary["last_validation"]["val/psnr"])
    tok = run.module.eval_tokenizer.eval()
    images = next(iter(run.datamodule.val_dataloader()))
    ids = tok.encode(images)
    assert all(int(ids[..., k].max()) < size for k, size in enumerate(tok.codebook_sizes)) and int(ids.min()) >= 0
    with torch.no_grad():
        assert torch.equal(tok.decode(ids), tok(images)[0])
    return run, tok, images, ids


# A 2-process (gloo) DDP run of the EMA-codebook recipe with k-means, dead-code restarts and the
# discriminator from step 2 (the adaptive weight over the replicated last layer). test_distributed
# checks the ranks stay identical; test_fsdp compares FSDP against it. One run serves both (~12 s).
TWO_PROCESS_RUN = ["experiment=cpu_vq_ema", "encoder.ch=8", "encoder.z_channels=8", "encoder.ch_mult=[1,2]",
                   "data.image_size=16", "data.batch_size=4", "data.val_batch_size=4", "loss.discriminator.ch=8",
                   "trainer.log_every_n_steps=1", "data.val_samples=8", "quantizer.codebook_size=1024",
                   "quantizer.kmeans_init_batches=2", "quantizer.dead_code_threshold=0.5", "loss.disc_start=2",
                   "trainer.devices=2", "trainer.max_steps=4", "trainer.val_check_interval=4",
                   "checkpoint.every_n_steps=2"]


def train_two_processes(run_dir: Path, *extra: str) -> str:
    """``train.py`` with :data:`TWO_PROCESS_RUN` and ``extra`` in a subprocess; returns its output."""
    env = dict(os.environ, IMAGETOK_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *TWO_PROCESS_RUN, *extra, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """The run directory of :data:`TWO_PROCESS_RUN` under DDP."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    train_two_processes(run_dir)
    return run_dir
