"""Non-finite losses (``optim.nonfinite``) and learning-rate scaling (``optim.lr_scaling``).

A NaN is injected by wrapping ``VQGANLoss.generator_loss`` so that chosen training batches return a
NaN pixel term (and so a NaN total), after the real forward pass has already updated the EMA codebook.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import ROOT
from imagetok.errors import ConfigValueError
from imagetok.losses.vqgan import VQGANLoss
from imagetok.training.module import TokenizerTrainingModule
from imagetok.training.run import build, scale_learning_rates, train
from imagetok.training.schedule import scaled_lr
from test_resume import _assert_same
from test_train_variants import SAMPLE, TINY

# EMA codebook (k-means from 2 batches, then moving-average updates inside every training forward)
# and the discriminator from step 1, so that a dropped update has something in every part to leave alone.
NAN_RUN = ["experiment=cpu_vq_ema", *TINY, *SAMPLE, "quantizer.codebook_size=64", "quantizer.kmeans_init_batches=2",
           "loss.disc_start=1", "optim.warmup_steps=1", "trainer.val_check_interval=100", "checkpoint.every_n_steps=2"]

# Run train.py as the CLI does, with generator_loss returning NaN at generator step $NAN_AT_STEP; at that
# moment it records the bytes of every checkpoint on disk in $CKPT_RECORD.
NAN_CLI = """
import hashlib, json, os, runpy, sys
from pathlib import Path
from imagetok.losses.vqgan import VQGANLoss

original = VQGANLoss.generator_loss

def generator_loss(self, images, recon, quant, step, last_layer=None):
    total, logs = original(self, images, recon, quant, step, last_layer)
    if step == int(os.environ["NAN_AT_STEP"]):
        folder = Path(os.environ["RUN_DIR"]) / "checkpoints"
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
        Path(os.environ["CKPT_RECORD"]).write_text(json.dumps(digests))
        nan = total.new_tensor(float("nan"))
        total, logs = total + nan, dict(logs, pixel=nan, total=nan)
    return total, logs

VQGANLoss.generator_loss = generator_loss
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def nan_at_batches(monkeypatch: pytest.MonkeyPatch, bad: set[int]) -> list[int]:
    """Make the training batches numbered ``bad`` (counted from 0, skipped ones included) return a NaN
    pixel term; returns the list that counts the calls."""
    original = VQGANLoss.generator_loss
    calls: list[int] = []

    def generator_loss(self, images, recon, quant, step, last_layer=None):
        total, logs = original(self, images, recon, quant, step, last_layer)
        calls.append(step)
        if len(calls) - 1 in bad:
            nan = total.new_tensor(float("nan"))
            total, logs = total + nan, dict(logs, pixel=nan, total=nan)
        return total, logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", generator_loss)
    return calls


def training_state(module: TokenizerTrainingModule) -> dict:
    """Everything an update changes: weights, EMA, quantizer buffers and codebook, discriminator,
    both optimisers and schedulers, and the skip counter aside."""
    trainer = module.trainer
    return copy.deepcopy({
        "module": module.state_dict(),
        "optimizers": [o.state_dict() for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
    })


def test_stop_names_the_term_and_step_and_leaves_the_last_checkpoint(tmp_path):
    run_dir, record = tmp_path / "run", tmp_path / "at_nan.json"
    env = dict(os.environ, IMAGETOK_OFFLINE="1", NAN_AT_STEP="3", RUN_DIR=str(run_dir), CKPT_RECORD=str(record))
    proc = subprocess.run([sys.executable, "-c", NAN_CLI, *NAN_RUN, "trainer.max_steps=6", "optim.nonfinite=stop",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    assert "training stopped: non-finite loss term(s) ['pixel', 'total'] at generator step 3" in output
    assert "Traceback" not in output
    before = json.loads(record.read_text())
    assert set(before) == {"last.ckpt", "step000002.ckpt"}
    assert _digests(run_dir / "checkpoints") == before  # byte for byte, and no NaN checkpoint beside them
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_skip_drops_the_whole_update_and_trains_to_max_steps(compose_config, tmp_path, monkeypatch):
    calls = nan_at_batches(monkeypatch, bad={2})
    around_bad_batch: dict[str, dict] = {}

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 2:
            around_bad_batch["before"] = training_state(self)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 2:
            around_bad_batch["after"] = training_state(self)

    monkeypatch.setattr(TokenizerTrainingModule, "on_train_batch_start", on_train_batch_start)
    monkeypatch.setattr(TokenizerTrainingModule, "on_train_batch_end", on_train_batch_end)
    # lr_scaling in the same run: global batch 4 for an lr set for 2 doubles both rates
    cfg = compose_config([*NAN_RUN, "trainer.max_steps=4", "optim.nonfinite=skip", "optim.max_skipped_steps=1",
                          "optim.lr_scaling=linear", "optim.base_batch_size=2"])
    run = train(cfg, tmp_path)

    assert calls == [0, 1, 2, 2, 3]  # the bad batch did not count as a step; training went on to max_steps
    assert run.trainer.global_step == 4 and run.module.skipped_steps == 1
    before, after = around_bad_batch["before"], around_bad_batch["after"]
    assert int(before["module"]["tokenizer.quantizer.step"]) >= 1  # the codebook was being updated by then
    _assert_same(before, after, "state")  # the bad batch changed nothing at all
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["skipped_steps"] == 1
    with open(tmp_path / "logs" / "metrics.csv") as f:
        skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(f) if r.get("train/skipped_steps")]
    assert skipped and max(skipped) == 1.0
    opt_g, opt_d = run.trainer.optimizers
    assert opt_g.param_groups[0]["initial_lr"] == pytest.approx(2 * cfg.optim.lr)
    assert opt_d.param_groups[0]["initial_lr"] == pytest.approx(2 * cfg.optim.lr)

    # Weights that went non-finite are never written over the last good checkpoint.
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    with torch.no_grad():
        run.module.tokenizer.decoder.last_layer.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite weights \['tokenizer\.decoder\.conv_out\.weight'\]"):
        run.trainer.save_checkpoint(last)
    assert last.read_bytes() == good and not list(last.parent.glob("*.tmp"))


def test_too_many_skipped_updates_stop_the_run(compose_config, tmp_path, monkeypatch):
    nan_at_batches(monkeypatch, bad={1, 2})
    cfg = compose_config([*NAN_RUN, "trainer.max_steps=4", "optim.nonfinite=skip", "optim.max_skipped_steps=1"])
    with pytest.raises(FloatingPointError, match=r"\['pixel', 'total'\] at generator step 1: 2 updates skipped, "
                                                 r"more than optim\.max_skipped_steps=1"):
        train(cfg, tmp_path)


@pytest.mark.parametrize("rule,expected", [("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)])
def test_lr_scaling_rules(rule, expected):
    assert scaled_lr(1e-3, rule, global_batch=256, base_batch_size=64) == pytest.approx(expected)
    assert scaled_lr(1e-3, rule, global_batch=64, base_batch_size=64) == pytest.approx(1e-3)


@pytest.mark.parametrize("rule,factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_startup_line_states_batch_devices_and_scaled_lr(compose_config, caplog, rule, factor):
    cfg = compose_config(["data.batch_size=4", f"optim.lr_scaling={rule}", "optim.base_batch_size=4",
                          "optim.disc_lr=1e-4"])
    module, _ = build(cfg)
    # What a 2 nodes x 2 devices job sees; the Trainer is only asked for its layout, never fitted.
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, logger=False, enable_checkpointing=False)
    with caplog.at_level(logging.INFO, logger="imagetok"):
        scale_learning_rates(module, cfg, trainer)
    lr, disc_lr = 8e-4 * factor, 1e-4 * factor
    assert module.optim["lr"] == pytest.approx(lr) and module.optim["disc_lr"] == pytest.approx(disc_lr)
    assert (f"batch 4 per device x 2 device(s) x 2 node(s) = global batch 16; lr 0.0008 -> {lr:.3g}, "
            f"disc_lr 0.0001 -> {disc_lr:.3g} (lr_scaling={rule}, base_batch_size=4)") in caplog.text


def test_startup_line_counts_accumulated_batches(compose_config, caplog):
    cfg = compose_config(["data.batch_size=8"])
    module, _ = build(cfg)
    layout = SimpleNamespace(num_devices=8, num_nodes=2, accumulate_grad_batches=2)
    with caplog.at_level(logging.INFO, logger="imagetok"):
        scale_learning_rates(module, cfg, layout)
    assert "batch 8 per device x 8 device(s) x 2 node(s) x 2 accumulated = global batch 256" in caplog.text
    assert "lr 0.0008 -> 0.0008" in caplog.text and "(lr_scaling=none)" in caplog.text
    assert math.isclose(module.optim["lr"], 8e-4)


@pytest.mark.parametrize("overrides,key,allowed", [
    (["optim.nonfinite=ignore"], "optim.nonfinite", "'stop' or 'skip'"),
    (["optim.max_skipped_steps=-1"], "optim.max_skipped_steps", "an integer >= 0"),
    (["optim.lr_scaling=cubic"], "optim.lr_scaling", "'none', 'linear' or 'sqrt'"),
    (["optim.lr_scaling=sqrt"], "optim.base_batch_size", "needed by optim.lr_scaling=sqrt"),
    (["optim.lr_scaling=linear", "optim.base_batch_size=0"], "optim.base_batch_size", "an integer >= 1"),
])
def test_bad_nonfinite_and_scaling_values_name_the_key(compose_config, overrides, key, allowed):
    with pytest.raises(ConfigValueError) as err:
        build(compose_config(overrides))
    assert err.value.key == key and allowed in str(err.value)
