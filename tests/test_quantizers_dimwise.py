"""Dimension-wise post-training quantization (TokenBridge): the KL bottleneck, Gaussian and empirical
bins, exact inverse after fitting, index ranges, fp32/bf16 index equality, and the fit command end to
end on a tiny trained checkpoint (fitted directory loads, decodes, and evaluates)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS
from imagetok import Tokenizer
from imagetok.errors import ConfigValueError
from imagetok.fit_quantizer import fit
from imagetok.quantizers.dimwise import DimensionWiseQuantizer, empirical_bins, gaussian_bins
from imagetok.training.run import tokenizer_config, train
from test_train_variants import SAMPLE, TINY


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


def _fitted(num_bins: int = 8, channels: int = 4) -> DimensionWiseQuantizer:
    q = DimensionWiseQuantizer(dim=2 * channels, num_bins=num_bins)
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(4096, channels, generator=g) * torch.linspace(0.5, 2, channels) + torch.arange(channels)
    q.set_bins(*empirical_bins(samples, num_bins))
    return q.eval()


def test_kl_loss_is_the_closed_form_and_training_samples_the_posterior():
    q = DimensionWiseQuantizer(dim=6, kl_weight=0.5)
    z = torch.randn(2, 6, 3, 5)
    mean, logvar = z[:, :3], z[:, 3:]
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    out = q.train()(z)
    assert torch.allclose(out.loss, 0.5 * expected, rtol=1e-5) and torch.allclose(out.metrics["kl"], expected, rtol=1e-5)
    assert out.z_q.shape == (2, 3, 3, 5) and q.out_dim == 3 and not torch.equal(out.z_q, mean)
    assert torch.equal(q.eval()(z).z_q, mean)  # eval: the posterior mean, continuous until fitted
    with pytest.raises(ConfigValueError, match="dim=7"):
        DimensionWiseQuantizer(dim=7)


def test_unfitted_quantizer_gives_provisional_indices_but_refuses_to_decode():
    q = DimensionWiseQuantizer(dim=8, num_bins=16).eval()
    out = q(torch.randn(2, 8, 4, 4) * 3)
    assert out.indices.shape == (2, 4, 4, 4) and q.codebook_sizes == [16] * 4
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 16
    assert set(out.metrics) >= {"perplexity/ch3", "entropy_bits/ch0", "batch_usage/ch1"}
    with pytest.raises(RuntimeError, match="python -m imagetok.fit_quantizer"):
        q.indices_to_latents(out.indices)
    with pytest.raises(RuntimeError, match="no fitted bins"):
        q.check_fitted()


def test_gaussian_bins_are_normal_quantiles_with_conditional_means():
    mean, std = torch.tensor([0.0, 1.5]), torch.tensor([1.0, 0.5])
    edges, values = gaussian_bins(mean, std, 8)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.arange(1, 8) / 8)
    assert torch.allclose(edges, mean[:, None] + std[:, None] * quantiles, atol=1e-6)
    _, two = gaussian_bins(mean, std, 2)  # E[Z | Z > 0] = sqrt(2 / pi)
    assert torch.allclose(two, mean[:, None] + std[:, None] * torch.tensor([-1, 1]) * math.sqrt(2 / math.pi))
    # on many normal samples the empirical fit converges to the Gaussian one
    samples = torch.randn(400_000, 2, generator=torch.Generator().manual_seed(1)) * std + mean
    e_edges, e_values = empirical_bins(samples, 8)
    assert torch.allclose(e_edges, edges, atol=0.02) and torch.allclose(e_values, values, atol=0.02)


def test_empirical_bins_are_torch_quantiles_and_bin_means():
    samples = torch.rand(1000, 3, generator=torch.Generator().manual_seed(2)).pow(3) * 5  # skewed
    edges, values = empirical_bins(samples, 4)
    for c in range(3):
        x = samples[:, c].double()
        assert torch.allclose(edges[c], torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).float())
        idx = torch.bucketize(x.float(), edges[c])
        assert torch.allclose(values[c], torch.stack([x[idx == k].mean() for k in range(4)]).float(), atol=1e-6)


def test_fitted_quantizer_is_exact_in_range_and_bf16_safe():
    q = _fitted(num_bins=8)
    assert q.codebook_sizes == [8] * 4 and q.is_fitted
    z = torch.randn(3, 8, 4, 4) * 3
    z[0, :4, 0, 0], z[0, :4, 0, 1] = 1e6, -1e6  # beyond the outer edges: the end bins
    out = q(z)
    assert out.indices.shape == (3, 4, 4, 4) and int(out.indices.min()) >= 0 and int(out.indices.max()) < 8
    assert (out.indices[0, 0, 0] == 7).all() and (out.indices[0, 0, 1] == 0).all()
    assert torch.equal(q.indices_to_latents(out.indices), out.z_q)
    seq = q(z.flatten(2).transpose(1, 2))  # [B, N, 2C] sequence layout
    assert torch.equal(seq.indices.reshape(out.indices.shape), out.indices)
    assert torch.equal(q.indices_to_latents(seq.indices, channels_last=True), seq.z_q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = q(z)
    assert torch.equal(mixed.indices, out.indices) and mixed.z_q.dtype == torch.float32
    with pytest.raises(ConfigValueError, match="indices"):
        q.indices_to_latents(torch.full((1, 2, 2, 4), 8))
    with pytest.raises(ConfigValueError, match="edges"):
        q.set_bins(torch.zeros(4, 6), torch.zeros(4, 8))


def test_fitted_quantizer_passes_gradients_straight_through():
    q = _fitted().train()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    assert torch.equal(q.lookup(out.indices.reshape(-1, 4)).reshape(2, 4, 4, 4).movedim(-1, 1), out.z_q.detach())
    (out.z_q.sum() + out.loss).backward()
    assert torch.allclose(z.grad[:, :4], torch.ones(2, 4, 4, 4) + q.kl_weight * z[:, :4].detach() / 32)
    assert z.grad[:, 4:].abs().sum() > 0  # the KL term reaches the log-variance


def test_fit_command_end_to_end_on_a_tiny_trained_tokenizer(tmp_path):
    cfg = _compose("train", ["experiment=cpu_tokenbridge", *TINY, *SAMPLE, "trainer.max_steps=6", "loss.disc_start=100"])
    run = train(cfg, tmp_path / "run")
    assert math.isfinite(run.summary["last_validation"]["val/psnr"])  # validation ran on provisional bins
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "fitted"
    fit(_compose("fit_quantizer", [f"checkpoint={checkpoint}", f"out={out}", "data.image_size=16", "num_images=12",
                                   "batch_size=5", "num_bins=8", "method=empirical"]))
    tok = Tokenizer.from_pretrained(out)
    assert tok.codebook_sizes == [8] * 4 and tok.quantizer.is_fitted
    report = json.loads((out / "quantizer_fit.json").read_text())
    assert report["num_images"] == 12 and report["num_latents"] == 12 * 64 and len(report["per_channel"]) == 4
    assert (out / "latent_histograms.png").stat().st_size > 0 and json.loads((out / "config.json").read_text())["quantizer_fit"]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = tok.encode(images)
    assert ids.shape == (2, 8, 8, 4) and int(ids.max()) < 8
    assert torch.equal(tok.decode(ids), tok(images)[0])
    # refitting the fitted directory with another bin count keeps every learned weight
    fit(_compose("fit_quantizer", [f"checkpoint={out}", f"out={tmp_path / 'g4'}", "data.image_size=16",
                                   "num_images=4", "num_bins=4"]))
    tok4 = Tokenizer.from_pretrained(tmp_path / "g4")
    assert tok4.codebook_sizes == [4] * 4 and torch.equal(tok4.decoder.conv_out.weight, tok.decoder.conv_out.weight)
    from imagetok.evaluation.run import evaluate

    results = evaluate(_compose("evaluate", [f"checkpoint={out}", "eval.metrics=[psnr,ssim,tokens]", "data.image_size=16",
                                             "eval.num_images=4"]), tmp_path / "eval")
    assert math.isfinite(results["psnr"]) and len(results["tokens"]) == 4
    vq = Tokenizer.from_config(tokenizer_config(_compose("train", TINY))).save_pretrained(tmp_path / "vq")
    with pytest.raises(ConfigValueError, match="quantizer=dimwise"):
        fit(_compose("fit_quantizer", [f"checkpoint={vq}", f"out={tmp_path / 'x'}"]))
