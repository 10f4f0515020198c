"""DiffAug, LeCAM, lazy R1 and REPA decoder alignment, on tiny networks; and one short CLI training run
with all of them and the DINO discriminator (random backbone) switched on."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from imagetok.errors import ConfigValueError
from imagetok.losses.diffaug import DiffAugment, cutout, translation
from imagetok.losses.regularizers import LeCAM, r1_penalty
from imagetok.losses.repa import DecoderAlignment
from imagetok.losses.vqgan import VQGANLoss
from imagetok.nets.foundation import FrozenBackbone

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_teacher() -> FrozenBackbone:
    return FrozenBackbone(random_backbone=True, input_size=28, blocks=[-1], norm=True, model_kwargs=TINY)


# ---- DiffAug ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("policies", [["translation"], ["cutout"], ["color"], ["translation", "cutout", "color"]])
def test_diffaug_keeps_shapes_and_passes_gradients(policies):
    torch.manual_seed(0)
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = DiffAugment(policies)(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaug_is_the_identity_when_empty_and_draws_nothing():
    x = torch.rand(2, 3, 8, 8)
    state = torch.get_rng_state()
    assert DiffAugment([])(x) is x and not DiffAugment([]).enabled
    assert torch.equal(torch.get_rng_state(), state)


def test_translation_shifts_whole_pixels_and_cutout_zeros_a_square():
    torch.manual_seed(1)
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).expand(8, 3, 16, 16).contiguous() + 1
    shifted = translation(x)
    for img in shifted:  # every kept value is a source pixel; the rest is zero fill
        kept = img[img != 0]
        assert torch.isin(kept, x[0]).all() and kept.numel() >= (14 * 14) * 3
    holes = (cutout(x) == 0).float().mean(dim=(1, 2, 3))
    assert (holes > 0).all() and (holes <= 0.25).all()


def test_bad_diffaug_policy_names_the_key(compose_config):
    from imagetok.training.run import build

    with pytest.raises(ConfigValueError) as err:
        build(compose_config(["loss.diffaug=[translation,rotate]"]))
    assert err.value.key == "loss.diffaug" and "'cutout'" in str(err.value)


@pytest.mark.parametrize("override,key", [("loss.lecam_weight=-1", "loss.lecam_weight"),
                                          ("loss.lecam_decay=1.5", "loss.lecam_decay"),
                                          ("loss.r1_every=0", "loss.r1_every"), ("loss.r1_weight=-2", "loss.r1_weight")])
def test_bad_regularizer_values_name_the_key(compose_config, override, key):
    from imagetok.training.run import build

    with pytest.raises(ConfigValueError) as err:
        build(compose_config([override]))
    assert err.value.key == key


# ---- LeCAM -----------------------------------------------------------------------------------------

def test_lecam_anchors_follow_the_mean_outputs_and_penalise_overshoot():
    lecam = LeCAM(decay=0.9)
    penalty = lecam(torch.full((4, 5), 2.0), torch.full((4, 5), -1.0))
    assert torch.isclose(lecam.anchor_real, torch.tensor(0.2)) and torch.isclose(lecam.anchor_fake, torch.tensor(-0.1))
    # relu(2 - (-0.1))^2 + relu(0.2 - (-1))^2
    assert torch.isclose(penalty, torch.tensor(2.1**2 + 1.2**2))


def _tiny_gan_loss(**kwargs) -> VQGANLoss:
    disc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))
    return VQGANLoss(discriminator=disc, perceptual_weight=0.0, disc_start=0, **kwargs)


def _disc_steps(loss: VQGANLoss, optimizer, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)  # the data of each step, independent of the history
        real, fake = (torch.rand(2, 2, 3, 8, 8, generator=generator) * 2 - 1)
        d_loss, _ = loss.discriminator_loss(real, fake, step=step)
        optimizer.zero_grad()
        d_loss.backward()
        optimizer.step()


def test_lecam_anchors_are_checkpointed_and_a_resume_is_bitwise(tmp_path):
    torch.manual_seed(0)
    straight = _tiny_gan_loss(lecam_weight=0.1, diffaug=["translation", "color"])
    assert {"lecam.anchor_real", "lecam.anchor_fake"} <= set(straight.state_dict())
    assert "lecam.anchor_real" not in _tiny_gan_loss().state_dict()  # off: the default keys stay as they were
    resumed = _tiny_gan_loss(lecam_weight=0.1, diffaug=["translation", "color"])
    resumed.load_state_dict(straight.state_dict())
    opt_a = torch.optim.Adam(straight.discriminator.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(resumed.discriminator.parameters(), lr=1e-2)

    torch.manual_seed(1)
    _disc_steps(straight, opt_a, range(3))
    torch.save({"loss": straight.state_dict(), "opt": opt_a.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")
    _disc_steps(straight, opt_a, range(3, 6))

    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed.load_state_dict(saved["loss"])
    opt_b.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    _disc_steps(resumed, opt_b, range(3, 6))
    assert float(straight.lecam.anchor_real) != 0.0
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---- R1 --------------------------------------------------------------------------------------------

class _TinyD(nn.Module):
    """``D(x) = v . tanh(W flatten(x))``: its input gradient has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.W, self.v = nn.Linear(3 * 4 * 4, 5, bias=False), nn.Linear(5, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.W(x.flatten(1))))

    def closed_form_r1(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.W(x.flatten(1)))  # dD/dx = W^T (v * (1 - tanh^2))
        grad = (self.v.weight * (1 - h**2)) @ self.W.weight
        return grad.pow(2).sum(1).mean()


def test_r1_equals_the_closed_form_gradient_penalty():
    torch.manual_seed(0)
    disc, x = _TinyD().double(), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    assert torch.allclose(r1_penalty(disc, x).double(), disc.closed_form_r1(x), rtol=1e-5)


def test_lazy_r1_runs_every_nth_discriminator_step_scaled_by_n():
    torch.manual_seed(0)
    disc = _TinyD()
    with_r1 = VQGANLoss(discriminator=disc, perceptual_weight=0.0, disc_start=10, r1_weight=2.0, r1_every=4)
    without = VQGANLoss(discriminator=disc, perceptual_weight=0.0, disc_start=10)
    real, fake = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    steps = [s for s in range(10, 20) if "r1" in with_r1.discriminator_loss(real, fake, step=s)[1]]
    assert steps == [10, 14, 18]  # discriminator steps 0, 4, 8
    d_r1, _ = with_r1.discriminator_loss(real, fake, step=14)
    d_plain, _ = without.discriminator_loss(real, fake, step=14)
    assert torch.allclose(d_r1 - d_plain, 0.5 * 2.0 * 4 * disc.closed_form_r1(real), rtol=1e-4)
    d_r1.backward()
    assert disc.W.weight.grad is not None  # the penalty trains the discriminator (create_graph)


# ---- REPA ------------------------------------------------------------------------------------------

def _small_cnn_decoder():
    from imagetok.nets.cnn import Decoder

    return Decoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=16,
                   mid_attention=False)


def test_repa_loss_falls_and_trains_projector_and_decoder_but_not_teacher(one_thread):
    torch.manual_seed(0)
    decoder, teacher = _small_cnn_decoder(), tiny_teacher()
    repa = DecoderAlignment(teacher=teacher, weight=1.0, hidden_dim=32)
    repa.attach(decoder, (8, 8))
    assert repa.layer == "up.1" and not list(repa.state_dict()) == []
    assert all(k.startswith("projector.") for k in repa.state_dict())  # the teacher stays out of checkpoints
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    z, images = torch.randn(4, 4, 8, 8), torch.rand(4, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam([*decoder.parameters(), *repa.parameters()], lr=3e-3)
    losses = []
    for _ in range(8):
        decoder(z)
        loss, logs = repa(images)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in repa.projector.parameters())
            assert decoder.up[1].block[0].conv1.weight.grad.abs().sum() > 0  # reached the decoder
            assert decoder.conv_out.weight.grad is None  # after the hooked layer: no REPA gradient
            assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_repa_hooks_a_vit_decoder_block():
    from imagetok.nets.vit import ViTDecoder

    decoder = ViTDecoder(patch_size=4, width=16, depth=2, num_heads=2, z_channels=4, resolution=16)
    repa = DecoderAlignment(teacher=tiny_teacher(), hidden_dim=16)
    repa.attach(decoder, (4, 4))
    assert repa.layer == "transformer.blocks.0"
    decoder(torch.randn(2, 4, 4, 4))
    loss, logs = repa(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert loss.shape == () and -1 <= float(logs["repa_cosine"]) <= 1


def test_repa_generator_loss_term_and_optimizer(compose_config):
    from imagetok.training.run import build

    module, _ = build(compose_config(["loss/repa=dinov2", "loss.repa.teacher.random_backbone=true",
                                      "loss.repa.teacher.input_size=28", "+loss.repa.teacher.model_kwargs={depth:2,embed_dim:32,num_heads:2}",
                                      "loss.repa.hidden_dim=16", "loss.repa.layer=up.0"]))
    (opt_g, _), _ = module.configure_optimizers()
    in_opt = {id(p) for group in opt_g.param_groups for p in group["params"]}
    assert {id(p) for p in module.loss.repa.projector.parameters()} <= in_opt
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quant = module.tokenizer(images)
    total, logs = module.loss.generator_loss(images, recon, quant, step=0)
    assert "repa" in logs and torch.isfinite(total)
    with pytest.raises(ConfigValueError) as err:
        build(compose_config(["loss/repa=dinov2", "loss.repa.teacher.random_backbone=true", "loss.repa.layer=nope",
                              "+loss.repa.teacher.model_kwargs={depth:2,embed_dim:32,num_heads:2}"]))
    assert err.value.key == "loss.repa.layer"


# ---- end to end ------------------------------------------------------------------------------------

ALL_ON = ["experiment=cpu_dino_disc", "loss/repa=dinov2", "loss.repa.teacher.random_backbone=true",
          "loss.repa.teacher.input_size=28", "loss.repa.hidden_dim=32", "loss.r1_weight=1.0", "loss.r1_every=2",
          "+loss.discriminator.backbone.model_kwargs={depth:4,embed_dim:32,num_heads:2}",
          "loss.discriminator.backbone.blocks=[1,3]", "+loss.repa.teacher.model_kwargs={depth:2,embed_dim:32,num_heads:2}",
          "trainer.max_steps=8", "loss.disc_start=2", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
          "data.val_samples=8", "data.val_batch_size=8", "data.batch_size=4", "checkpoint.every_n_steps=8"]


def test_cli_trains_with_dino_disc_diffaug_lecam_r1_and_repa(tmp_path, monkeypatch):
    import csv

    from imagetok.cli import train

    monkeypatch.setattr(sys, "argv", ["train", *ALL_ON, f"hydra.run.dir={tmp_path}"])
    train.main()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["generator_steps"] == 8
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for term in ("train/disc", "train/lecam", "train/r1", "train/repa", "train/adversarial"):
        assert any(r.get(term) for r in rows), term
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "loss.lecam.anchor_real" in state and any(k.startswith("loss.repa.projector.") for k in state)
    assert not any(".net." in k for k in state if k.startswith("loss."))  # no backbone weights in the checkpoint


def test_cpu_dino_disc_recipe_trains_from_the_cli(tmp_path, monkeypatch):
    """The recipe as shipped (ViT-S/14 layout, random weights), with its discriminator from step 2."""
    from imagetok.cli import train

    monkeypatch.setattr(sys, "argv", ["train", "experiment=cpu_dino_disc", "trainer.max_steps=4", "loss.disc_start=2",
                                      "trainer.val_check_interval=4", f"hydra.run.dir={tmp_path}"])
    train.main()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["generator_steps"] == 4 and summary["last_validation"]["val/psnr"] > 5
