"""Configs compose, CLI overrides reach the parts, recipes build, and bad values fail before training
with a message that names the key and the allowed values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from imagetok.errors import ConfigValueError, MissingWeightsError
from imagetok.tokenizer import Tokenizer
from imagetok.training.run import build, tokenizer_config

ROOT = Path(__file__).resolve().parents[1]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_cli_overrides_reach_every_part(compose_config):
    cfg = compose_config(["quantizer.codebook_size=4096", "encoder.ch_mult=[1,2,2,4]", "trainer.max_steps=2000",
                          "data.batch_size=16"])
    assert cfg.trainer.max_steps == 2000 and cfg.data.batch_size == 16
    tok = Tokenizer.from_config(tokenizer_config(cfg))
    assert tok.codebook_sizes == [4096]
    assert tok.downsample_factor == 8 and list(cfg.decoder.ch_mult) == [1, 2, 2, 4]  # decoder follows
    assert tok.token_shape(cfg.data.image_size) == (cfg.data.image_size // 8, cfg.data.image_size // 8, 1)


@pytest.mark.parametrize("name,expected_millions", [("llamagen_vq16", 71.88), ("taming_vqgan_f16", 76.07)])
def test_published_recipes_build_the_published_architectures(compose_config, name, expected_millions):
    cfg = compose_config([f"experiment={name}", "data.root=/unused"])
    tok = Tokenizer.from_config(tokenizer_config(cfg))
    enc_dec = n_params(tok.encoder) + n_params(tok.decoder)
    assert abs(enc_dec / 1e6 - 71.75) < 0.01  # both: the VQGAN f16 conv nets, 71.7M
    assert abs(n_params(tok) / 1e6 - expected_millions) < 0.01
    assert tok.token_shape(256) == (16, 16, 1) and tok.codebook_sizes == [16384]


def test_cpu_recipe_selects_ema_kmeans_restarts(compose_config):
    cfg = compose_config(["experiment=cpu_vq_ema"])
    module, _ = build(cfg)
    vq = module.tokenizer.quantizer
    assert vq.codebook_update == "ema" and vq.kmeans_init_batches == 4 and vq.dead_code_threshold > 0


def test_unknown_quantizer_lists_the_options(compose_config):
    with pytest.raises(MissingConfigException) as err:
        compose_config(["quantizer=nonexistent"])
    assert "quantizer" in str(err.value) and "vq" in str(err.value)


@pytest.mark.parametrize("override,key,allowed", [
    ("quantizer.codebook_size=0", "quantizer.codebook_size", "positive integer"),
    ("quantizer.codebook_update=sgd", "quantizer.codebook_update", "'loss' or 'ema'"),
    ("data.image_size=30", "data.image_size", "multiple of the encoder's downsampling factor 4"),
    ("encoder.ch_mult=[]", "encoder.ch_mult", "non-empty list"),
    ("loss.gan_loss=wgan", "loss.gan_loss", "'hinge' or 'non_saturating'"),
    ("loss.discriminator.norm=layer", "loss.discriminator.norm", "'group', 'batch' or 'none'"),
    ("trainer.precision=16-mixed", "trainer.precision", "bf16-mixed"),
    ("data.batch_size=0", "data.batch_size", "integer >= 1"),
])
def test_bad_values_name_key_and_allowed_values(compose_config, override, key, allowed):
    cfg = compose_config([override])
    with pytest.raises(ConfigValueError) as err:
        build(cfg)
    assert err.value.key == key and allowed in str(err.value)


def test_missing_data_directory(compose_config, tmp_path):
    cfg = compose_config(["data=imagefolder", f"data.root={tmp_path / 'nope'}", "data.image_size=64"])
    with pytest.raises(ConfigValueError, match=r"data\.root=.*nope.*existing directory containing 'train/'"):
        build(cfg)


def test_explicit_perceptual_weight_without_vgg_weights_stops(compose_config):
    cfg = compose_config(["loss.perceptual_weight=1.0"])
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth.*loss\.perceptual_weights_path"):
        build(cfg)


def test_auto_perceptual_weight_without_vgg_weights_trains_without_it(compose_config, caplog):
    module, _ = build(compose_config([]))
    assert module.loss.perceptual_weight == 0.0
    assert "Training without the perceptual (LPIPS) term" in caplog.text and "vgg16-397923af.pth" in caplog.text


def test_cli_reports_bad_value_in_one_line_without_traceback(tmp_path):
    env = dict(os.environ, IMAGETOK_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", "quantizer.codebook_size=0", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "quantizer.codebook_size=0 is invalid: allowed values are a positive integer" in output
    assert "Traceback" not in output
    # the bad model value is reported before the loss looks for LPIPS weights
    assert "perceptual" not in output


@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
def test_a_checkpoint_that_is_not_ours_is_one_line_in_every_entry_point(tmp_path, script):
    import torch

    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    extra = [f"out={tmp_path / 'out'}"] if script == "export.py" else [f"hydra.run.dir={tmp_path / 'eval'}"]
    proc = subprocess.run([sys.executable, script, f"checkpoint={bad}", *extra], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, IMAGETOK_OFFLINE="1"), timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "is not an imagetok training checkpoint" in output
    assert "Traceback" not in output
