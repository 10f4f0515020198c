"""Losses: LPIPS weight loading and freezing, GAN objectives, adaptive weight, discriminator start."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import vgg16

from imagetok.errors import MissingWeightsError
from imagetok.losses.discriminator import PatchGANDiscriminator, discriminator_loss, generator_adversarial_loss
from imagetok.losses.perceptual import LPIPS
from imagetok.losses.vqgan import VQGANLoss
from imagetok.quantizers.base import QuantizerOutput


def test_lpips_loads_a_local_vgg16_file_into_its_backbone(tmp_path):
    torch.manual_seed(0)
    reference = vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    lp = LPIPS(weights_path=str(path))
    assert torch.equal(lp.net.net.slice1[0].weight, reference.features[0].weight)
    assert torch.equal(getattr(lp.net.net.slice5, "28").bias, reference.features[28].bias)
    assert all(not p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs() < 1e-6 and lp(x, -x) > 0


def test_lpips_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        LPIPS(weights_path=str(tmp_path / "absent.pth"))
    message = str(err.value)
    assert "\n" not in message and "absent.pth" in message and "loss.perceptual_weights_path" in message


def test_perceptual_network_stays_out_of_state_dict_and_parameters():
    loss = VQGANLoss(discriminator=PatchGANDiscriminator(ch=8, n_layers=2), perceptual_weight=1.0,
                     perceptual_random_backbone=True)
    assert loss.perceptual_weight == 1.0
    assert all(k.startswith("discriminator.") for k in loss.state_dict())
    assert sum(p.numel() for p in loss.parameters()) == sum(p.numel() for p in loss.discriminator.parameters())


def test_gan_objectives():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert torch.isclose(discriminator_loss("hinge", real, fake), torch.tensor(0.5 * (0.25 + 0.5)))
    assert torch.isclose(generator_adversarial_loss("hinge", fake), torch.tensor(1.0))
    ns = discriminator_loss("non_saturating", real, fake)
    expected = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert torch.isclose(ns, expected)


def test_patchgan_shapes():
    disc = PatchGANDiscriminator(ch=16, n_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def _generator_terms(disc_start: int, step: int, adaptive: bool = True):
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = last(torch.randn(2, 4, 16, 16))
    quant = QuantizerOutput(z_q=recon, indices=torch.zeros(2, 1, dtype=torch.long), loss=torch.tensor(0.3))
    loss = VQGANLoss(discriminator=PatchGANDiscriminator(ch=8, n_layers=1), perceptual_weight=0.0,
                     disc_start=disc_start, disc_weight=0.5, adaptive_disc_weight=adaptive)
    return loss, loss.generator_loss(images, recon, quant, step, last.weight), last, images, recon


def test_discriminator_not_used_before_start():
    loss, (total, logs), *_ = _generator_terms(disc_start=10, step=9)
    assert "adversarial" not in logs and not loss.discriminator_active(9) and loss.discriminator_active(10)
    assert torch.isclose(total, logs["pixel"] + 0.3)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    loss, (total, logs), last, images, recon = _generator_terms(disc_start=0, step=0)
    nll = torch.nn.functional.l1_loss(recon, images)
    adv = generator_adversarial_loss("hinge", loss.discriminator(recon))
    g1 = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(adv, last.weight, retain_graph=True)[0]
    expected = g1.norm() / (g2.norm() + 1e-4)
    assert torch.isclose(logs["adaptive_weight"], expected, rtol=1e-5)
    assert torch.isclose(total, logs["pixel"] + 0.3 + 0.5 * expected * logs["adversarial"], rtol=1e-5)
    _, (_, fixed), *_ = _generator_terms(disc_start=0, step=0, adaptive=False)
    assert fixed["adaptive_weight"] == 1.0


def test_the_adaptive_weights_shortcut_gives_the_gradients_of_the_plain_objective():
    """generator_loss differentiates LPIPS and the discriminator once (d total / d recon handed on):
    every generator gradient equals that of ``nll + quantizer + disc_weight * w * adversarial``."""
    torch.manual_seed(0)
    encoder, last = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 3, 3, padding=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = VQGANLoss(discriminator=PatchGANDiscriminator(ch=8, n_layers=1), perceptual_weight=0.0,
                     disc_start=0, disc_weight=0.5, adaptive_disc_weight=True)
    grads = []
    for shortcut in (True, False):
        features = encoder(images)
        recon = last(features)
        quant = QuantizerOutput(z_q=recon, indices=torch.zeros(2, 1, dtype=torch.long), loss=features.pow(2).mean())
        if shortcut:
            total, logs = loss.generator_loss(images, recon, quant, 0, last.weight)
        else:
            weight = logs["adaptive_weight"]
            total = (torch.nn.functional.l1_loss(recon, images) + quant.loss
                     + 0.5 * weight * generator_adversarial_loss("hinge", loss.discriminator(recon)))
            assert torch.isclose(total, logs["total"], rtol=1e-6)
        params = [*encoder.parameters(), *last.parameters()]
        grads.append(torch.autograd.grad(total, params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
