"""``from=magvit2``: SEED-Voken's Open-MAGVIT2 (LFQ) and IBQ checkpoints, made here in their key layout
(an imagetok MAGVIT-v2 tokenizer's weights under Open-MAGVIT2's names; taming's layout for IBQ), with
LitEma shadows (``model_ema.<name without dots>``) that differ from the raw weights. Agreement with
SEED-Voken's own classes is checked by ``benchmarks/verify_magvit2.py`` (README, Export)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS
from foreign_checkpoints import MAGVIT2_BITS as BITS
from foreign_checkpoints import MAGVIT2_NETS as NETS
from foreign_checkpoints import ibq_checkpoint, lfq_checkpoint, llamagen_state, taming_state
from imagetok import Tokenizer
from imagetok.errors import CheckpointError
from imagetok.export.converters.magvit2 import convert_magvit2, looks_like_magvit2
from imagetok.export.run import export
from imagetok.nets.magvit2 import AdaptiveGroupNorm, DepthToSpaceUpsample

def _images(size: int = 8) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1


def test_lfq_converts_with_ema_weights_and_bit_order():
    checkpoint = lfq_checkpoint()
    tok = convert_magvit2(checkpoint)
    state = checkpoint["state_dict"]
    assert torch.equal(tok.encoder.conv_in.weight, state["model_ema.encoderconv_inweight"])
    assert torch.equal(tok.decoder.up[1].upsample.conv.bias, state["model_ema.decoderup1upsampleconv1bias"])
    assert tok.codebook_sizes == [2**BITS] and tok.downsample_factor == 2
    x = _images()
    with torch.no_grad():
        ids = tok.encode(x)
        z = tok.encoder(x).permute(0, 2, 3, 1)  # no quant_conv in Open-MAGVIT2: ours is the identity
        assert torch.equal(tok.quant_conv(tok.encoder(x)).permute(0, 2, 3, 1), z)
        recon, _ = tok(x)
    # Open-MAGVIT2's index: bit j = [z_j > 0], worth 2^j (channel 0 least significant)
    assert ids.shape == (2, 4, 4, 1)
    assert torch.equal(ids[..., 0], ((z > 0).long() * 2 ** torch.arange(BITS)).sum(-1))
    assert torch.equal(tok.indices_to_latents(ids).permute(0, 2, 3, 1), torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(tok.decode(ids), recon)  # decode(encode(x)) is the eval-mode forward
    raw = convert_magvit2(checkpoint, weights="raw")
    assert torch.equal(raw.encoder.conv_in.weight, state["encoder.conv_in.weight"])


def test_lfq_token_factorization_from_the_yaml_splits_the_index():
    checkpoint = lfq_checkpoint()
    config = {"model": {"class_path": "src.Open_MAGVIT2.models.lfqgan.VQModel",
                        "init_args": {"token_factorization": True, "factorized_bits": [3, 3], "n_embed": 64,
                                      "embed_dim": BITS, "ddconfig": {**NETS, "double_z": False}}}}
    whole, split = convert_magvit2(checkpoint), convert_magvit2(checkpoint, config)
    x = _images()
    ids, parts = whole.encode(x), split.encode(x)
    assert split.codebook_sizes == [8, 8] and parts.shape == (2, 4, 4, 2)
    assert torch.equal(parts[..., 0] + 8 * parts[..., 1], ids[..., 0])  # (channels 0..2, channels 3..5)
    assert torch.equal(split.decode(parts), whole.decode(ids))
    # the repo's AR configs split unequally ([6, 12] of 18 bits): here [2, 4] of 6
    config["model"]["init_args"]["factorized_bits"] = [2, 4]
    uneven = convert_magvit2(checkpoint, config)
    parts = uneven.encode(x)
    assert uneven.codebook_sizes == [4, 16] and torch.equal(parts[..., 0] + 4 * parts[..., 1], ids[..., 0])
    assert torch.equal(uneven.decode(parts), whole.decode(ids))
    assert int(parts[..., 1].max()) > 3  # the second sub-token really spans 2^4 codes
    wrong = {"model": {"init_args": {"ddconfig": {**NETS, "ch": 64}}}}
    with pytest.raises(CheckpointError, match="ddconfig.ch=64 does not fit"):
        convert_magvit2(checkpoint, wrong)


def test_ibq_converts_with_the_largest_inner_product():
    checkpoint = ibq_checkpoint()
    tok = convert_magvit2(checkpoint)
    codes = checkpoint["state_dict"]["model_ema.quantizeembeddingweight"]
    assert torch.equal(tok.quantizer.codebook, codes) and tok.codebook_sizes == [64]
    assert tok.quantizer.similarity == "dot" and not tok.quantizer.l2_normalize
    x = _images()
    with torch.no_grad():
        ids = tok.encode(x)
        z = tok.quant_conv(tok.encoder(x)).permute(0, 2, 3, 1)
        recon, _ = tok(x)
    assert ids.shape == (2, 4, 4, 1)
    assert torch.equal(ids[..., 0], (z @ codes.t()).argmax(-1))  # IBQ: argmax softmax(z.c), not the nearest code
    assert torch.equal(tok.decode(ids), recon)


def test_detection_and_the_ibq_layout_without_ema_needs_its_yaml():
    assert looks_like_magvit2(lfq_checkpoint()) and looks_like_magvit2(ibq_checkpoint())
    assert not looks_like_magvit2({"state_dict": taming_state()}) and not looks_like_magvit2({"model": llamagen_state()})
    with pytest.raises(CheckpointError, match="from=taming"):
        convert_magvit2(ibq_checkpoint(ema=False))
    ibq_yaml = {"model": {"class_path": "src.IBQ.models.ibqgan.IBQ", "init_args": {"n_embed": 64, "embed_dim": 8}}}
    assert convert_magvit2(ibq_checkpoint(ema=False), ibq_yaml).codebook_sizes == [64]
    with pytest.raises(CheckpointError, match="not an Open-MAGVIT2/IBQ checkpoint"):
        convert_magvit2({"model": llamagen_state()})


def test_depth_to_space_and_adaptive_group_norm_follow_open_magvit2():
    up = DepthToSpaceUpsample(2)
    x = torch.randn(1, 2, 3, 3)
    y, out = up.conv(x), up(x)
    for i in range(2):
        for j in range(2):  # output pixel (2h+i, 2w+j), channel c <- input channel (2i+j) * C + c
            assert torch.equal(out[:, :, i::2, j::2], y[:, (2 * i + j) * 2:(2 * i + j + 1) * 2])
    norm = AdaptiveGroupNorm(z_channels=3, channels=4)
    h, z = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 4, 4)
    flat = z.flatten(2)
    std = (flat.var(-1, unbiased=True) + 1e-6).sqrt()
    expected = norm.gamma(std)[..., None, None] * F.group_norm(h, norm.gn.num_groups, eps=1e-6) \
        + norm.beta(flat.mean(-1))[..., None, None]
    assert torch.allclose(norm(h, z), expected, atol=1e-6)


def _run_cli(monkeypatch, capsys, args: list[str]) -> str:
    from imagetok.cli import export as export_cli

    monkeypatch.setattr(sys, "argv", ["export", *args])
    with pytest.raises(SystemExit) as exited:
        export_cli.main()
    out = capsys.readouterr()
    assert exited.value.code == 2, out.out + out.err
    return out.out + out.err


@pytest.mark.parametrize("kind", ["taming", "text"])
def test_a_wrong_checkpoint_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, kind):
    path = tmp_path / "wrong.ckpt"
    if kind == "taming":
        torch.save({"state_dict": taming_state()}, path)
    else:
        path.write_text("hello\n")
    output = _run_cli(monkeypatch, capsys, ["from=magvit2", f"checkpoint={path}", f"out={tmp_path / 'out'}"])
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in output, output
    expected = ("from=taming",) if kind == "taming" else ("is not a readable checkpoint", "cannot be read safely")
    assert any(text in lines[0] for text in expected), lines[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_cli_converts_with_config_and_raw_weights(tmp_path):
    torch.save(lfq_checkpoint(), tmp_path / "imagenet_256_L.ckpt")
    (tmp_path / "lfq.yaml").write_text(yaml.safe_dump(
        {"model": {"class_path": "src.Open_MAGVIT2.models.lfqgan.VQModel",
                   "init_args": {"token_factorization": True, "factorized_bits": [3, 3]}}}))
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("export", overrides=["from=magvit2", f"checkpoint={tmp_path / 'imagenet_256_L.ckpt'}",
                                           f"out={tmp_path / 'out'}", f"config={tmp_path / 'lfq.yaml'}", "weights=raw"])
    tok = Tokenizer.from_pretrained(export(cfg))
    assert tok.codebook_sizes == [8, 8]
    assert torch.equal(tok.encoder.conv_in.weight, lfq_checkpoint()["state_dict"]["encoder.conv_in.weight"])
    x = _images()
    assert torch.equal(tok.decode(tok.encode(x)), tok(x)[0])
