"""Non-finite losses and gradients (``optim.nonfinite``) and learning-rate scaling (``optim.lr_scaling``).

A NaN is injected by wrapping ``VQGANLoss.generator_loss`` so that chosen training batches return a
NaN pixel term (and so a NaN total), after the real forward pass has already updated the EMA codebook;
in CLI runs (also across ranks) by the same wrapper in a test-only ``sitecustomize`` (tests/nan_shim).
A NaN gradient behind a finite loss comes from a hook on the loss tensor.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
import subprocess
import sys

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

# A test-only sitecustomize that makes generator_loss return NaN at generator step $NAN_AT_STEP in train.py
# and in every rank process Lightning starts from it (see its docstring).
NAN_SHIM = ROOT / "tests" / "nan_shim"


def _cli(run_dir, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """``train.py`` with the NaN shim on PYTHONPATH and ``env`` (NAN_AT_STEP, ...) added."""
    path = os.pathsep.join(filter(None, [str(NAN_SHIM), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, IMAGETOK_OFFLINE="1", PYTHONPATH=path, RUN_DIR=str(run_dir), **env)
    return subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


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
    proc = _cli(run_dir, *NAN_RUN, "trainer.max_steps=6", "optim.nonfinite=stop", NAN_AT_STEP="3",
                CKPT_RECORD=str(record))
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
    # BatchNorm in the discriminator: the generator loss's forward through it moves its running statistics
    cfg = compose_config([*NAN_RUN, "trainer.max_steps=4", "optim.nonfinite=skip", "optim.max_skipped_steps=1",
                          "optim.lr_scaling=linear", "optim.base_batch_size=2", "loss.discriminator.norm=batch"])
    run = train(cfg, tmp_path)

    assert calls == [0, 1, 2, 2, 3]  # the bad batch did not count as a step; training went on to max_steps
    assert run.trainer.global_step == 4 and run.module.skipped_steps == 1
    before, after = around_bad_batch["before"], around_bad_batch["after"]
    assert int(before["module"]["tokenizer.quantizer.step"]) >= 1  # the codebook was being updated by then
    assert int(before["module"]["loss.discriminator.main.3.num_batches_tracked"]) >= 1  # and the running statistics
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


def _discriminator_state(module: TokenizerTrainingModule) -> dict:
    """The discriminator's weights, optimiser and scheduler: what a discriminator update changes."""
    trainer, disc = module.trainer, module.loss.discriminator
    return copy.deepcopy({"weights": dict(disc.named_parameters()), "optimizer": trainer.optimizers[1].state_dict(),
                          "scheduler": trainer.lr_scheduler_configs[1].scheduler.state_dict()})


def test_skip_on_a_nonfinite_gradient_and_in_the_discriminator(compose_config, tmp_path, monkeypatch, caplog):
    """A finite loss with a NaN gradient skips the generator's update (the gradient-norm check); a NaN
    discriminator loss, or a NaN discriminator gradient, skips that update alone, and the discriminator's
    running statistics keep no trace of the NaN images it saw."""
    original_g, original_d = VQGANLoss.generator_loss, VQGANLoss.discriminator_loss
    calls: list[int] = []
    nan_gradient = lambda grad: grad * float("nan")  # noqa: E731  (the loss's value stays finite)

    def generator_loss(self, images, recon, quant, step, last_layer=None):
        total, logs = original_g(self, images, recon, quant, step, last_layer)
        calls.append(step)
        if len(calls) - 1 == 1:
            total.register_hook(nan_gradient)
        return total, logs

    def discriminator_loss(self, images, recon, discriminator=None, step=None):
        batch = len(calls) - 1
        if batch == 2:  # NaN real images: NaN logits, loss and (unless put back) BatchNorm statistics
            images = torch.full_like(images, float("nan"))
        loss, logs = original_d(self, images, recon, discriminator, step=step)
        if batch == 3:
            loss.register_hook(nan_gradient)
        return loss, logs

    states: dict[int, dict] = {}

    def on_train_batch_start(self, batch, batch_idx):
        states[batch_idx] = {"all": training_state(self), "disc": _discriminator_state(self)}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx in (1, 2, 3):
            states[batch_idx] |= {"all after": training_state(self), "disc after": _discriminator_state(self)}

    monkeypatch.setattr(VQGANLoss, "generator_loss", generator_loss)
    monkeypatch.setattr(VQGANLoss, "discriminator_loss", discriminator_loss)
    monkeypatch.setattr(TokenizerTrainingModule, "on_train_batch_start", on_train_batch_start)
    monkeypatch.setattr(TokenizerTrainingModule, "on_train_batch_end", on_train_batch_end)
    cfg = compose_config([*NAN_RUN, "trainer.max_steps=4", "optim.nonfinite=skip", "optim.max_skipped_steps=3",
                          "loss.discriminator.norm=batch", "checkpoint.every_n_steps=100"])
    with caplog.at_level(logging.WARNING, logger="imagetok"):
        run = train(cfg, tmp_path)

    assert calls == [0, 1, 1, 2, 3] and run.trainer.global_step == 4 and run.module.skipped_steps == 3
    _assert_same(states[1]["all"], states[1]["all after"], "state")  # NaN generator gradient: nothing changed
    for batch in (2, 3):  # the generator stepped, the discriminator did not
        _assert_same(states[batch]["disc"], states[batch]["disc after"], f"discriminator at batch {batch}")
        g_steps = [int(s["step"]) for s in states[batch]["all after"]["optimizers"][0]["state"].values()][0]
        assert g_steps == batch  # one generator step per batch but batch 1
    buffers = dict(run.module.loss.discriminator.named_buffers())
    assert buffers and all(torch.isfinite(b).all() for b in buffers.values())
    for what in ["grad_norm/generator at generator step 1: generator and discriminator updates skipped (1 of",
                 "disc, logits_real at generator step 1: discriminator update skipped (2 of",
                 "grad_norm/discriminator at generator step 2: discriminator update skipped (3 of at most 3)"]:
        assert f"non-finite {what}" in caplog.text


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


@pytest.mark.parametrize("overrides,key,allowed", [
    (["optim.nonfinite=ignore"], "optim.nonfinite", "'stop' or 'skip'"),
    (["optim.max_skipped_steps=-1"], "optim.max_skipped_steps", "an integer >= 0"),
    (["optim.lr_scaling=cubic"], "optim.lr_scaling", "'none', 'linear' or 'sqrt'"),
    (["optim.lr_scaling=sqrt"], "optim.base_batch_size", "needed by optim.lr_scaling=sqrt"),
    (["optim.lr_scaling=linear", "optim.base_batch_size=0"], "optim.base_batch_size", "an integer >= 1"),
    (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches", "1: imagetok optimises manually"),
])
def test_bad_nonfinite_and_scaling_values_name_the_key(compose_config, overrides, key, allowed):
    with pytest.raises(ConfigValueError) as err:
        build(compose_config(overrides))
    assert err.value.key == key and allowed in str(err.value)


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_a_nan_on_one_rank_stops_or_skips_both(tmp_path, nonfinite):
    """2 processes (gloo), a NaN at step 2 on rank 1 only: rank 0, whose own loss is finite, must take
    the same decision (a rank that went on alone would wait forever in its next collective)."""
    run_dir, exits = tmp_path / "run", tmp_path / "exits"
    exits.mkdir()
    proc = _cli(run_dir, *NAN_RUN, "trainer.devices=2", "trainer.max_steps=4", f"optim.nonfinite={nonfinite}",
                "checkpoint.every_n_steps=100", NAN_AT_STEP="2", NAN_RANK="1", EXIT_RECORD=str(exits))
    output = proc.stdout + proc.stderr
    if nonfinite == "stop":
        assert proc.returncode == 3, output[-3000:]
        assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": "3", "rank1": "3"}
        assert "training stopped: non-finite loss term(s) ['pixel', 'total'] at generator step 2" in output  # rank 1
        assert "training stopped: non-finite loss term(s) on another rank at generator step 2" in output  # rank 0
        return
    assert proc.returncode == 0, output[-3000:]
    assert not list(exits.iterdir())
    # logged by rank 0, whose own terms were finite
    assert "non-finite (on another rank) at generator step 2: generator and discriminator updates skipped" in output
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["generator_steps"] == 4 and summary["ranks_in_sync"] is True
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["skipped_steps"] == 1
