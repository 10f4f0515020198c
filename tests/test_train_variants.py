"""Training paths beyond the default: EMA codebook with k-means and restarts, ImageFolder data,
bf16-mixed precision, and what protects checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from imagetok.training.callbacks import AtomicCheckpointIO
from imagetok.training.nonfinite import DeferredFiniteChecks
from imagetok.training.run import train
from test_data import _tree

TINY = ["encoder.ch=8", "encoder.z_channels=8", "encoder.ch_mult=[1,2]", "data.image_size=16",
        "data.batch_size=4", "data.val_batch_size=4", "loss.discriminator.ch=8",
        "trainer.val_check_interval=6", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=6"]
SAMPLE = ["data.val_samples=4"]


def test_ema_codebook_recipe_with_kmeans_and_restarts_trains(compose_config, tmp_path):
    cfg = compose_config(["experiment=cpu_vq_ema", *TINY, *SAMPLE, "quantizer.codebook_size=64", "quantizer.kmeans_init_batches=2",
                          "quantizer.dead_code_threshold=0.5", "trainer.max_steps=6", "loss.disc_start=3"])
    run = train(cfg, tmp_path)
    vq = run.module.tokenizer.quantizer
    assert bool(vq.initialized) and int(vq.step) == 5  # 2 pooling batches; updates from the second on
    assert not vq.codebook.requires_grad
    assert run.trainer.global_step == 6 and math.isfinite(run.summary["last_validation"]["val/psnr"])


def test_imagefolder_data_from_the_cli_config(compose_config, tmp_path):
    _tree(tmp_path / "data", n=4, size=(20, 24))
    cfg = compose_config(["data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_workers=0", *TINY,
                          "trainer.max_steps=3", "trainer.val_check_interval=3", "loss.disc_start=1"])
    run = train(cfg, tmp_path / "run")
    assert run.trainer.global_step == 3 and (tmp_path / "run" / "reconstructions.png").is_file()


def test_bf16_mixed_training_steps_stay_finite(compose_config, tmp_path):
    cfg = compose_config([*TINY, *SAMPLE, "trainer.precision=bf16-mixed", "trainer.max_steps=4", "trainer.val_check_interval=4",
                          "loss.disc_start=2"])
    run = train(cfg, tmp_path)
    assert run.trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in run.module.tokenizer.parameters())
    assert run.module.tokenizer.quantizer.codebook.dtype == torch.float32


def test_deferred_non_finite_check_names_the_term_and_step_one_step_later():
    checks = DeferredFiniteChecks()
    checks.add({"pixel": torch.tensor(0.1), "perceptual": torch.tensor(float("nan"))})
    checks.add({"grad_norm/generator": torch.tensor(float("inf"))})
    checks.add({})  # no gradient norm without clipping (optim.grad_clip=null)
    checks.end_step(7, torch.device("cpu"))
    checks.raise_if_nonfinite(before_step=7)  # step 7's own flags wait for the next step
    with pytest.raises(FloatingPointError, match=r"\['perceptual'\] at generator step 7"):
        checks.raise_if_nonfinite(before_step=8)
    checks.raise_if_nonfinite()  # read once: nothing queued any more


def test_interrupted_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_misspelt_key_is_refused_by_hydra(compose_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not override 'quantizer.codebok_size'"):
        compose_config(["quantizer.codebok_size=5"])
