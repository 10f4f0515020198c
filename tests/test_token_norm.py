"""``encoder.output_norm=batch`` (``nets/token_norm.py``): per-(token, channel) standardisation of a 1D
encoder's output over the batch; equal to affine-free batch norm, causal-safe, running estimates in
eval, bitwise-equal buffers on 2 data-parallel ranks, and the CLI's one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from imagetok.errors import ConfigValueError
from imagetok.nets.hybrid import HybridLatentTokenEncoder
from imagetok.nets.latent_tokens import LatentTokenEncoder
from imagetok.nets.token_norm import TokenStandardize, make_output_norm


def test_training_output_is_batch_norm_per_token_and_channel_and_eval_uses_running_estimates():
    torch.manual_seed(0)
    z = torch.randn(16, 5, 3) * torch.tensor([0.1, 2.0, 5.0]) + 7.0  # a large constant part, as a readout's
    norm = TokenStandardize(5, 3, momentum=0.5).train()
    out = norm(z)
    reference = torch.nn.functional.batch_norm(z.flatten(1), None, None, training=True, eps=1e-5).view_as(z)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert out.mean(0).abs().max() < 1e-5 and (out.var(0, unbiased=False) - 1).abs().max() < 1e-2  # eps
    torch.testing.assert_close(norm.running_mean, 0.5 * z.mean(0))  # lerp from 0 with momentum 0.5
    norm.eval()
    expected = (z - norm.running_mean) / (norm.running_var + 1e-5).sqrt()
    torch.testing.assert_close(norm(z), expected)
    torch.testing.assert_close(norm(z[:, :2]), expected[:, :2])  # a prefix uses the first statistics


def test_a_token_is_normalised_by_its_own_statistics_only():
    """Token i's output never depends on tokens after it, so causal encoders stay causal."""
    norm = TokenStandardize(4, 2).train()
    z = torch.randn(8, 4, 2, requires_grad=True)
    norm(z)[:, 1].sum().backward()
    assert z.grad[:, [0, 2, 3]].abs().max() == 0


@pytest.mark.parametrize("encoder", ["plain", "hybrid"])
def test_both_1d_encoders_standardise_their_output(encoder):
    torch.manual_seed(0)
    if encoder == "plain":
        net = LatentTokenEncoder(patch_size=4, width=32, depth=1, num_heads=2, z_channels=8, resolution=16,
                                 num_latent_tokens=6, causal=True, output_norm="batch")
    else:
        net = HybridLatentTokenEncoder(ch=8, width=32, depth=1, num_heads=2, z_channels=8, resolution=16,
                                       num_latent_tokens=6, causal=True, output_norm="batch")
    z = net.train()(torch.rand(10, 3, 16, 16) * 2 - 1)
    assert tuple(z.shape) == (10, 6, 8)
    assert z.mean(0).abs().max() < 1e-4 and (z.var(0, unbiased=False) - 1).abs().max() < 1e-2
    assert set(net.state_dict()) >= {"output_norm.running_mean", "output_norm.running_var"}
    with pytest.raises(ConfigValueError, match="output_norm"):
        make_output_norm("layer", 6, 8)


def test_two_process_training_with_output_norm_keeps_ranks_in_sync(tmp_path):
    """DDP on 2 gloo processes: the batch statistics are averaged over ranks, so the running buffers
    (and everything else) end bitwise equal (``ranks_in_sync``)."""
    run_dir = tmp_path / "run"
    small = ["experiment=cpu_hybrid", "encoder.output_norm=batch", "encoder.ch=8", "encoder.width=32",
             "encoder.depth=1", "encoder.num_heads=2", "data.image_size=16", "data.batch_size=4",
             "data.val_batch_size=4", "data.val_samples=8", "loss.discriminator.ch=8", "trainer.max_steps=4",
             "trainer.val_check_interval=4", "checkpoint.every_n_steps=4", "loss.disc_start=2",
             "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "train.py", *small], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, IMAGETOK_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    running = [v for k, v in state.items() if k.endswith("output_norm.running_mean")]
    assert running and all(float(v.abs().sum()) > 0 for v in running)  # the estimates were updated


def test_a_bad_output_norm_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "experiment=cpu_hybrid", "encoder.output_norm=layer",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, IMAGETOK_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "output_norm" in proc.stderr + proc.stdout, proc.stderr[-2000:]
