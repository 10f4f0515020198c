"""End-to-end training of the composed default config: the loss falls, files are written, the
checkpoint reloads into a Tokenizer that reproduces the training-time reconstruction, and a run resumes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagetok.tokenizer import Tokenizer
from imagetok.training.callbacks import reconstruction_grid
from imagetok.training.run import train

SHORT = ["trainer.max_steps=40", "trainer.log_every_n_steps=1", "trainer.val_check_interval=20", "loss.disc_start=20", "data.val_samples=8",
         "data.val_batch_size=8", "checkpoint.every_n_steps=20", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One short run of the default config (the README's `python train.py`, fewer steps)."""
    import os
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONFIGS

    os.environ["IMAGETOK_OFFLINE"] = "1"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=SHORT)
    run_dir = tmp_path_factory.mktemp("run")
    return cfg, run_dir, train(cfg, run_dir)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_loss_falls_and_outputs_are_written(default_run):
    _, run_dir, result = default_run
    rows = [r for r in read_csv(run_dir / "logs" / "metrics.csv") if r.get("train/pixel")]
    pixel = [float(r["train/pixel"]) for r in rows]
    assert len(pixel) == 40
    assert np.mean(pixel[-5:]) < 0.8 * np.mean(pixel[:5]), pixel
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [v["step"] for v in metrics["validation"]] == [20, 40]
    assert metrics["generator_steps"] == 40 and metrics["tokenizer_parameters"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "reconstructions" / "step_000040.png").is_file()
    assert Image.open(run_dir / "reconstructions.png").size[0] > 0


def test_global_step_counts_generator_steps(default_run):
    _, _, result = default_run
    assert result.trainer.global_step == 40
    opt_g, opt_d = (o.optimizer if hasattr(o, "optimizer") else o for o in result.trainer.optimizers)
    g_steps = {int(s["step"]) for s in opt_g.state.values()}
    d_steps = {int(s["step"]) for s in opt_d.state.values()}
    assert g_steps == {40} and d_steps == {20}  # the discriminator started at generator step 20


def test_checkpoint_reproduces_training_time_reconstruction(default_run):
    cfg, run_dir, result = default_run
    batch = next(iter(result.datamodule.val_dataloader()))
    trained = result.module.eval_tokenizer.eval()
    with torch.no_grad():
        expected, _ = trained(batch)
    loaded = Tokenizer.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert not loaded.training
    with torch.no_grad():
        recon, _ = loaded(batch)
        assert torch.equal(recon, expected)
        assert torch.equal(loaded.decode(loaded.encode(batch)), expected)
    # ... and equals the grid the run saved at its last validation (uint8 PNG of the same images)
    saved = np.asarray(Image.open(run_dir / "reconstructions" / "step_000040.png").convert("RGB"))
    grid = reconstruction_grid(batch[:8], recon[:8]).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert np.array_equal(saved, grid.permute(1, 2, 0).numpy())
    raw = Tokenizer.from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights="raw")
    assert not torch.equal(raw.decoder.conv_out.weight, loaded.decoder.conv_out.weight)


def test_resume_continues_the_run(default_run, compose_config, tmp_path):
    _, run_dir, _ = default_run
    cfg = compose_config(SHORT + ["trainer.max_steps=50", f"resume={run_dir / 'checkpoints' / 'last.ckpt'}"])
    resumed = train(cfg, tmp_path)
    assert resumed.trainer.global_step == 50
    assert resumed.summary["generator_steps"] == 50
    # the validation history travelled in the checkpoint
    assert [v["step"] for v in resumed.summary["validation"]] == [20, 40]


def test_resume_last_without_checkpoint_starts_fresh(compose_config, tmp_path):
    from imagetok.training.checks import resolve_resume

    assert resolve_resume("last", tmp_path, tmp_path / "outputs") is None
    (tmp_path / "outputs" / "a" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "outputs" / "a" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    assert resolve_resume("last", tmp_path / "new", tmp_path / "outputs") == str(ckpt)
