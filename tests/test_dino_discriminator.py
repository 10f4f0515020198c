"""The DINO discriminator and the frozen-backbone loader: the heads train while the backbone stays
bitwise frozen, inputs are resized and normalised for the backbone, weights load from a file or the
Hugging Face cache, and a missing file is one line naming it (also through the CLI)."""

from __future__ import annotations

import sys

import pytest
import torch

from imagetok.errors import MissingWeightsError
from imagetok.losses.discriminators.dino import DINODiscriminator
from imagetok.losses.discriminators.objectives import discriminator_loss, generator_adversarial_loss
from imagetok.nets.foundation import FrozenBackbone, hf_repo

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}  # a ViT-S/14 layout, shrunk; random weights


def tiny_backbone(**kwargs) -> FrozenBackbone:
    args = dict(random_backbone=True, input_size=28, blocks=[0, 1], model_kwargs=TINY) | kwargs
    return FrozenBackbone(**args)


@pytest.fixture(autouse=True)
def empty_hf_cache(monkeypatch, tmp_path):
    """No test sees a developer's Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def test_heads_train_while_the_backbone_stays_bitwise_frozen(one_thread):
    torch.manual_seed(0)
    disc = DINODiscriminator(backbone=tiny_backbone(), head_channels=8)
    backbone = disc.backbone
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    heads = {k: v.clone() for k, v in disc.state_dict().items()}
    assert all(k.startswith("heads.") for k in disc.state_dict())  # the backbone stays out of checkpoints
    assert not {id(p) for p in disc.parameters()} & {id(p) for p in backbone.parameters()}
    optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-2)
    disc.train()
    assert not backbone.training and all(not p.requires_grad for p in backbone.parameters())
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(3):
        fake = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
        loss = discriminator_loss("hinge", disc(real), disc(fake)) + generator_adversarial_loss("hinge", disc(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert fake.grad is not None and fake.grad.abs().sum() > 0  # gradients pass through the backbone
    assert all(torch.equal(frozen[k], v) for k, v in backbone.state_dict().items())
    assert all(p.grad is None for p in backbone.parameters())
    assert any(not torch.equal(heads[k], v) for k, v in disc.state_dict().items() if "original" in k)


@pytest.mark.parametrize("side", [32, 64])
def test_inputs_are_resized_and_normalised_for_the_backbone(one_thread, side):
    backbone = tiny_backbone()
    grey = torch.zeros(2, 3, side, side)  # 0 in [-1, 1] is 0.5 in [0, 1]
    x = backbone.preprocess(grey)
    assert x.shape == (2, 3, 28, 28)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-6)
    features = backbone(grey)
    assert [f.shape for f in features] == [(2, 32, 2, 2)] * 2  # 28 / 14 = 2 tokens a side, 2 blocks
    disc = DINODiscriminator(backbone=backbone, head_channels=8)
    assert disc(grey).shape == (2, 2 * 2 * 2)  # every head's per-token logits


def test_runs_in_the_trainers_precision(one_thread):
    disc = DINODiscriminator(backbone=tiny_backbone(), head_channels=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert disc(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16
    assert disc(torch.zeros(1, 3, 32, 32)).dtype == torch.float32


def test_weights_load_from_a_file_or_the_hugging_face_cache(tmp_path, one_thread):
    from safetensors.torch import save_file

    source = tiny_backbone(seed=3)
    state = {k: v.contiguous() for k, v in source.net.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    repo = hf_repo("vit_small_patch14_dinov2")  # the cache layout huggingface_hub writes
    snapshot = tmp_path / "hf_cache" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth", None):
        loaded = FrozenBackbone(weights_path=str(path) if path else None, input_size=28, blocks=[0, 1],
                                model_kwargs=TINY, seed=7)
        assert all(torch.equal(a, b) for a, b in zip(source.parameters(), loaded.parameters()))


def test_missing_weights_are_one_line_naming_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        FrozenBackbone(weights_path=str(tmp_path / "dinov2_vits14.safetensors"), config_key="loss.x.weights_path")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "dinov2_vits14.safetensors") in message
    assert "timm/vit_small_patch14_dinov2.lvd142m" in message and "huggingface-cli download" in message
    assert "loss.x.weights_path=<file>" in message and "model.safetensors" in message
    with pytest.raises(MissingWeightsError, match="not in the Hugging Face cache"):
        FrozenBackbone()


def test_cli_names_the_missing_weights_in_one_line(tmp_path, monkeypatch, capsys):
    from imagetok.cli import train

    monkeypatch.setattr(sys, "argv", ["train", "loss/discriminator=dino", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exited:
        train.main()
    out = capsys.readouterr()
    output = out.out + out.err
    assert exited.value.code == 2 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "error:" in line]
    assert "timm/vit_small_patch14_dinov2.lvd142m" in line
    assert "loss.discriminator.backbone.weights_path=<file>" in line


def test_bad_blocks_name_the_key(compose_config):
    from imagetok.errors import ConfigValueError
    from imagetok.training.run import build

    with pytest.raises(ConfigValueError) as err:
        build(compose_config(["experiment=cpu_dino_disc", "loss.discriminator.backbone.blocks=[2,12]"]))
    assert err.value.key == "loss.discriminator.backbone.blocks" and "has 12 blocks" in str(err.value)


def test_gigatok_recipe_has_a_large_decoder_and_the_dino_parts(compose_config):
    from imagetok.tokenizer import Tokenizer
    from imagetok.training.run import tokenizer_config

    cfg = compose_config(["experiment=gigatok_bl_dino"])
    with torch.device("meta"):  # sizes without allocating 1.5 GB
        tok = Tokenizer.from_config(tokenizer_config(cfg))
    assert round(sum(p.numel() for p in tok.decoder.parameters()) / 1e6, 1) == 303.4  # ViT-L: width 1024, depth 24
    assert tok.codebook_sizes == [16384] and tok.token_shape(256) == (16, 16, 1)
    assert cfg.loss.discriminator.backbone.model == "vit_small_patch14_dinov2" and not cfg.loss.discriminator.backbone.random_backbone
    assert cfg.loss.repa.teacher.model == "vit_base_patch14_dinov2" and cfg.loss.diffaug == ["translation", "cutout", "color"]
    assert cfg.trainer.precision == "bf16-mixed"


def test_model_card_names_the_dinov2_weights_a_run_used():
    from imagetok.export.model_card import third_party_weights

    backbone = {"model": "vit_small_patch14_dinov2", "random_backbone": False}
    lines = third_party_weights({"loss": {"perceptual_weight": 0, "discriminator": {"backbone": backbone},
                                          "repa": {"teacher": dict(backbone, model="vit_base_patch14_dinov2")}}}, False)
    assert any("timm/vit_small_patch14_dinov2.lvd142m" in line and "DINO discriminator" in line for line in lines)
    assert any("timm/vit_base_patch14_dinov2.lvd142m" in line and "REPA" in line for line in lines)
    random = {"loss": {"perceptual_weight": 0, "discriminator": {"backbone": dict(backbone, random_backbone=True)}}}
    assert third_party_weights(random, False) == []
