"""Exact resume: 2N steps in one process equal N steps, a checkpoint, and N more in a fresh process.

Compared bitwise (``torch.equal``) on CPU: tokenizer, EMA copy, quantizer buffers (k-means, EMA
codebook, dead-code counts), discriminator, both optimisers and schedulers, the global random
generators, step counters and the data position (the next batch either run would train on).
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from imagetok.data.sample import SampleDataModule
from imagetok.training.module import TokenizerTrainingModule
from imagetok.training.run import train
from imagetok.training.schedule import lr_lambda
from test_train_variants import SAMPLE, TINY

N = 4
# EMA codebook with k-means from 2 batches and dead-code restarts (which draw from the global
# generator), the discriminator from step 2, a validation right after the step-N checkpoint.
RESUME = ["experiment=cpu_vq_ema", *TINY, *SAMPLE, "quantizer.codebook_size=64", "quantizer.kmeans_init_batches=2",
          "quantizer.dead_code_threshold=0.5", "loss.disc_start=2", "optim.warmup_steps=2", f"trainer.max_steps={2 * N}",
          f"checkpoint.every_n_steps={N}", f"trainer.val_check_interval={N}", "checkpoint.keep=3"]


def _train(run_dir, *extra):
    env = dict(os.environ, IMAGETOK_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *RESUME, *extra, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same(a, b, where=""):
    """Nested checkpoint values equal: tensors bitwise (dtype and shape too), the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight)
    middle = straight / "checkpoints" / f"step{N:06d}.ckpt"
    proc = _train(resumed, f"resume={middle}")
    assert "resuming from" in proc.stdout + proc.stderr

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 2 * N
    assert int(a["state_dict"]["tokenizer.quantizer.step"]) > N  # the codebook kept updating after the resume
    assert any(k.startswith("ema.module.") for k in a["state_dict"])
    assert any(k.startswith("loss.discriminator.") for k in a["state_dict"])
    _assert_same(a["state_dict"], b["state_dict"], "state_dict")  # tokenizer, EMA, quantizer buffers, D
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert [int(s["step"]) for s in a["optimizer_states"][1]["state"].values()][0] == 2 * N - 2  # D from step 2
    _assert_same(a["callbacks"]["RandomState"], b["callbacks"]["RandomState"], "rng")
    assert a["skipped_steps"] == b["skipped_steps"] == 0
    loop_a, loop_b = a["loops"]["fit_loop"], b["loops"]["fit_loop"]
    assert loop_a["epoch_progress"]["current"] == loop_b["epoch_progress"]["current"]
    position_a, position_b = loop_a["state_dict"]["combined_loader"], loop_b["state_dict"]["combined_loader"]
    assert position_a == position_b == [{"batches_served": 2 * N, "batch_size": 4}]

    # The data position: a loader restored from the checkpoint gives the batch a straight run trains on next.
    data = SampleDataModule(image_size=16, batch_size=4, val_samples=4, seed=0)
    expected = list(zip(range(2 * N + 1), data.train_dataloader()))[-1][1]
    restored = data.train_dataloader()
    restored.load_state_dict(position_b[0])
    assert torch.equal(next(iter(restored)), expected)


def test_resume_trains_with_the_configured_learning_rates(compose_config, tmp_path, monkeypatch, caplog):
    """A resumed run that doubles its rates (lr_scaling for another global batch) and lengthens its
    schedule trains with the new schedule at the step it reached, not with the checkpoint's rates."""
    common = [*TINY, *SAMPLE, "loss.disc_start=1", "optim.warmup_steps=1", "optim.disc_lr=4e-4",
              "trainer.val_check_interval=100"]
    train(compose_config([*common, "trainer.max_steps=2"]), tmp_path / "first")
    used: list[tuple[float, float]] = []

    def on_train_batch_start(self, batch, batch_idx):
        used.append(tuple(opt.param_groups[0]["lr"] for opt in self.trainer.optimizers))

    monkeypatch.setattr(TokenizerTrainingModule, "on_train_batch_start", on_train_batch_start)
    # global batch 4 for rates set for 2: both doubled
    cfg = compose_config([*common, "trainer.max_steps=4", "optim.lr_scaling=linear", "optim.base_batch_size=2",
                          f"resume={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    with caplog.at_level(logging.INFO, logger="imagetok"):
        train(cfg, tmp_path / "resumed")

    lr, disc_lr = 2 * cfg.optim.lr, 2 * cfg.optim.disc_lr
    # step 2 of 4 for the generator; the discriminator has taken 1 of its 3 steps (from step 1)
    expected = (lr * lr_lambda("cosine", 1, 4, cfg.optim.min_lr_ratio)(2),
                disc_lr * lr_lambda("cosine", 1, 3, cfg.optim.min_lr_ratio)(1))
    assert used[0] == pytest.approx(expected, rel=1e-12)
    with open(tmp_path / "resumed" / "logs" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}
    assert logged[2] == pytest.approx(expected[0], rel=1e-6)  # the rate that step used, as logged
    assert (f"learning rates differ from the checkpoint's: lr {cfg.optim.lr:.3g} -> {lr:.3g}, disc_lr "
            f"{cfg.optim.disc_lr:.3g} -> {disc_lr:.3g}; the configured schedule continues from generator step 2"
            ) in caplog.text
