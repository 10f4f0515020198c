"""Exact resume: 2N steps in one process equal N steps, a checkpoint, and N more in a fresh process.

Compared bitwise (``torch.equal``) on CPU: tokenizer, EMA copy, quantizer buffers (k-means, EMA
codebook, dead-code counts), discriminator, both optimisers and schedulers, the global random
generators, step counters and the data position (the next batch either run would train on).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from conftest import ROOT
from imagetok.data.sample import SampleDataModule
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
