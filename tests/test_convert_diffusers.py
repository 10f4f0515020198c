"""``from=diffusers``: a diffusers ``VQModel`` directory (``config.json`` + safetensors in diffusers' own
tensor names, written by ``foreign_checkpoints``) converts into a Tokenizer whose encode/decode equal an
independent functional forward pass written here from ``VQModel``'s structure (linear attention
projections, SpatialNorm on the nearest-upsampled quantized latent, ``cdist`` nearest code). diffusers
itself is not needed; the last test also checks against it when it is installed."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from foreign_checkpoints import DIFFUSERS_SMALL, DIFFUSERS_SPATIAL, diffusers_vq_directory, diffusers_vq_state
from imagetok import Tokenizer
from imagetok.errors import CheckpointError, ConfigValueError
from imagetok.export.converters import convert_checkpoint, convert_diffusers, load_original_checkpoint
from test_cli_errors import _entry_points, _error_lines, _run_in_process

CONFIGS = {"group": DIFFUSERS_SMALL, "spatial": DIFFUSERS_SPATIAL}


# --- VQModel's forward pass, functionally --------------------------------------------------------------
def _conv(s, p, x, pad=1, stride=1):
    return F.conv2d(x, s[f"{p}.weight"], s[f"{p}.bias"], stride=stride, padding=pad)


def _norm(s, p, x, groups, zq):
    if f"{p}.conv_y.weight" in s:  # SpatialNorm: GroupNorm(32) modulated by the upsampled quantized latent
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        normed = F.group_norm(x, 32, s[f"{p}.norm_layer.weight"], s[f"{p}.norm_layer.bias"], eps=1e-6)
        return normed * _conv(s, f"{p}.conv_y", zq, pad=0) + _conv(s, f"{p}.conv_b", zq, pad=0)
    return F.group_norm(x, groups, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-6)


def _res(s, p, x, groups, zq=None):
    h = _conv(s, f"{p}.conv1", F.silu(_norm(s, f"{p}.norm1", x, groups, zq)))
    h = _conv(s, f"{p}.conv2", F.silu(_norm(s, f"{p}.norm2", h, groups, zq)))
    skip = _conv(s, f"{p}.conv_shortcut", x, pad=0) if f"{p}.conv_shortcut.weight" in s else x
    return (skip + h) / 1.0  # output_scale_factor 1


def _attn(s, p, x, groups, zq=None):
    b, c, hh, ww = x.shape
    norm = f"{p}.spatial_norm" if f"{p}.spatial_norm.conv_y.weight" in s else f"{p}.group_norm"
    tokens = _norm(s, norm, x, groups, zq).reshape(b, c, hh * ww).transpose(1, 2)  # [B, HW, C]
    q, k, v = (F.linear(tokens, s[f"{p}.{n}.weight"], s[f"{p}.{n}.bias"]) for n in ("to_q", "to_k", "to_v"))
    out = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
    out = F.linear(out, s[f"{p}.to_out.0.weight"], s[f"{p}.to_out.0.bias"])
    return x + out.transpose(1, 2).reshape(b, c, hh, ww)


def _block(s, p, x, groups, zq=None):
    j = 0
    while f"{p}.resnets.{j}.conv1.weight" in s:
        x = _res(s, f"{p}.resnets.{j}", x, groups, zq)
        if f"{p}.attentions.{j}.to_q.weight" in s:
            x = _attn(s, f"{p}.attentions.{j}", x, groups, zq)
        j += 1
    if f"{p}.downsamplers.0.conv.weight" in s:
        x = _conv(s, f"{p}.downsamplers.0.conv", F.pad(x, (0, 1, 0, 1)), pad=0, stride=2)
    if f"{p}.upsamplers.0.conv.weight" in s:
        x = _conv(s, f"{p}.upsamplers.0.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return x


def _mid(s, p, x, groups, zq=None):
    x = _res(s, f"{p}.resnets.0", x, groups, zq)
    if f"{p}.attentions.0.to_q.weight" in s:
        x = _attn(s, f"{p}.attentions.0", x, groups, zq)
    return _res(s, f"{p}.resnets.1", x, groups, zq)


def reference(s, x, groups):
    """(indices [B, h, w], decoded images) as ``VQModel`` encodes, quantizes and decodes."""
    n = len({k.split(".")[2] for k in s if k.startswith("encoder.down_blocks.")})
    h = _conv(s, "encoder.conv_in", x)
    for i in range(n):
        h = _block(s, f"encoder.down_blocks.{i}", h, groups)
    h = _mid(s, "encoder.mid_block", h, groups)
    h = _conv(s, "encoder.conv_out", F.silu(_norm(s, "encoder.conv_norm_out", h, groups, None)))
    h = _conv(s, "quant_conv", h, pad=0)
    b, c, hh, ww = h.shape
    codes = s["quantize.embedding.weight"]
    idx = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, c), codes).argmin(1)
    quant = codes[idx].reshape(b, hh, ww, c).permute(0, 3, 1, 2)
    h = _conv(s, "decoder.conv_in", _conv(s, "post_quant_conv", quant, pad=0))
    h = _mid(s, "decoder.mid_block", h, groups, quant)
    for k in range(n):
        h = _block(s, f"decoder.up_blocks.{k}", h, groups, quant)
    h = _conv(s, "decoder.conv_out", F.silu(_norm(s, "decoder.conv_norm_out", h, groups, quant)))
    return idx.reshape(b, hh, ww), h


def _images(batch=2, size=32):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _converted(tmp_path, kind):
    directory = diffusers_vq_directory(tmp_path / kind, CONFIGS[kind])
    return convert_diffusers(load_original_checkpoint(directory), checkpoint_path=directory)


@pytest.mark.parametrize("kind", ["group", "spatial"])
def test_encode_and_decode_equal_a_functional_vqmodel(tmp_path, kind):
    tok, state, images = _converted(tmp_path, kind), diffusers_vq_state(CONFIGS[kind]), _images()
    ref_idx, ref_images = reference(state, images, CONFIGS[kind]["norm_num_groups"])
    idx = tok.encode(images)
    assert idx.shape == (2, 16, 16, 1) and ref_idx.unique().numel() > 8  # many codes in use: a real test
    assert torch.equal(idx[..., 0], ref_idx)
    torch.testing.assert_close(tok.decode(idx), ref_images, atol=1e-5, rtol=1e-5)
    decoder = tok.config["decoder"]
    assert decoder["condition_channels"] == (4 if kind == "spatial" else None)
    assert decoder["norm_groups"] == (32 if kind == "spatial" else 8)  # SpatialNorm's 32, else norm_num_groups


@pytest.mark.parametrize("kind", ["group", "spatial"])
def test_save_pretrained_round_trip_of_the_converted_tokenizer(tmp_path, kind):
    tok, images = _converted(tmp_path, kind), _images(1)
    loaded = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "out"))
    assert loaded.config == tok.config
    idx = tok.encode(images)
    assert torch.equal(loaded.encode(images), idx)
    assert torch.equal(loaded.decode(idx), tok.decode(idx))


def test_the_weights_file_alone_converts_with_its_config_json_beside_it_or_defaults(tmp_path, caplog):
    directory = diffusers_vq_directory(tmp_path / "vq", DIFFUSERS_SMALL)
    weights = directory / "diffusion_pytorch_model.safetensors"
    tok = convert_diffusers(load_original_checkpoint(weights), checkpoint_path=weights)
    assert tok.config["encoder"]["norm_groups"] == 8
    alone = tmp_path / "alone" / weights.name
    alone.parent.mkdir()
    shutil.copy(weights, alone)
    tok = convert_diffusers(load_original_checkpoint(alone), checkpoint_path=alone)
    assert tok.config["encoder"]["norm_groups"] == 32 and "no config.json" in caplog.text  # VQModel's default
    tok = convert_diffusers(load_original_checkpoint(alone), config=directory / "config.json")
    assert tok.config["encoder"]["norm_groups"] == 8


@pytest.mark.parametrize("override,message", [
    ({"act_fn": "gelu"}, "config.json act_fn='gelu' is not supported: imagetok converts 'silu', 'swish'"),
    ({"norm_type": "ada_group"}, "config.json norm_type='ada_group' is not supported: imagetok converts 'group', 'spatial'"),
    ({"down_block_types": ["DownEncoderBlock2D", "SimpleDownEncoderBlock2D"]},
     "config.json down_block_types has 'SimpleDownEncoderBlock2D', which is not supported: VQModel's nets use "
     "DownEncoderBlock2D or AttnDownEncoderBlock2D"),
    ({"_class_name": "AutoencoderKL"}, "config.json _class_name='AutoencoderKL' is not supported: imagetok converts 'VQModel'"),
    ({"norm_num_groups": 12}, "config.json norm_num_groups=12 does not divide every width [32, 64]"),
    ({"layers_per_block": 2}, "config.json layers_per_block=2 does not fit the tensors (1)"),
])
def test_a_config_value_imagetok_cannot_match_is_refused_naming_it(tmp_path, override, message):
    directory = diffusers_vq_directory(tmp_path / "vq", DIFFUSERS_SMALL, **override)
    with pytest.raises(CheckpointError) as refused:
        convert_checkpoint("diffusers", load_original_checkpoint(directory), directory, checkpoint_path=directory)
    assert str(refused.value) == f"{directory} (diffusers): {message}"


@pytest.mark.parametrize("override,extra,message", [
    ({"act_fn": "mish"}, [], "config.json act_fn='mish' is not supported: imagetok converts 'silu', 'swish'"),
    ({}, ["pixel_range=[0,255]"], "pixel_range=[0, 255] is invalid: allowed values are [0,1] (aMUSEd) or [-1,1] "
                                  "(MoVQ, LDM), or null (from the pipeline's model_index.json)"),
])
def test_an_unsupported_value_through_the_cli_is_one_error_line(tmp_path, monkeypatch, capsys, override, extra, message):
    directory = diffusers_vq_directory(tmp_path / "vq", DIFFUSERS_SPATIAL, **override)
    output = _run_in_process(monkeypatch, capsys, "export", ["from=auto", f"checkpoint={directory}",
                                                              f"out={tmp_path / 'out'}", *extra])
    (line,) = _error_lines(output)
    assert line.endswith(f"error: {directory} (diffusers): {message}")
    assert "Traceback" not in output and not (tmp_path / "out" / "model.safetensors").exists()


def test_the_cli_takes_a_pixel_range(tmp_path, monkeypatch):
    directory = diffusers_vq_directory(tmp_path / "vq", DIFFUSERS_SMALL)
    monkeypatch.setattr(sys, "argv", ["export", "from=diffusers", f"checkpoint={directory}", f"out={tmp_path / 'out'}",
                                      "pixel_range=[0,1]"])
    _entry_points()["export"]()
    assert Tokenizer.from_pretrained(tmp_path / "out").config["decoder"]["pixel_range"] == [0.0, 1.0]


def test_a_spatial_decoder_needs_a_condition_as_wide_as_the_quantized_latent():
    nets = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4}
    with pytest.raises(ConfigValueError, match="decoder.condition_channels=6 is invalid"):
        Tokenizer.from_config({"encoder": {"_target_": "imagetok.nets.cnn.Encoder", **nets},
                               "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **nets, "condition_channels": 6},
                               "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": 4,
                                             "codebook_size": 16}})


@pytest.mark.parametrize("kind", ["group", "spatial"])
def test_against_diffusers_itself_when_installed(tmp_path, kind):
    """The same claim as above, against diffusers' own VQModel (skipped where diffusers is absent: CI)."""
    diffusers = pytest.importorskip("diffusers")
    directory = diffusers_vq_directory(tmp_path / kind, CONFIGS[kind])
    model = diffusers.VQModel.from_pretrained(directory).eval()
    tok, images = convert_diffusers(load_original_checkpoint(directory), checkpoint_path=directory), _images(1)
    with torch.no_grad():
        h = model.encode(images).latents
        _, _, (_, _, flat) = model.quantize(h)
        b, c, hh, ww = h.shape
        codes = model.quantize.get_codebook_entry(flat, (b, hh, ww, c))
        expected = model.decode(codes, force_not_quantize=True).sample
        unquantized = model.decode(h, force_not_quantize=True).sample  # how Kandinsky decodes diffusion latents
    idx = tok.encode(images)
    assert torch.equal(idx.reshape(-1), flat)
    torch.testing.assert_close(tok.decode(idx), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.decode_latents(tok.quant_conv(tok.encoder(images))), unquantized, atol=1e-4, rtol=1e-4)


def test_a_bin_file_with_the_older_attention_names_converts_the_same(tmp_path):
    """diffusers' ``.bin`` weights and its pre-0.14 attention names (``query/key/value/proj_attn``)."""
    modern = _converted(tmp_path, "spatial")
    old = {re.sub(r"\.to_(q|k|v)\.", lambda m: "." + {"q": "query", "k": "key", "v": "value"}[m.group(1)] + ".", k)
           .replace(".to_out.0.", ".proj_attn."): v for k, v in diffusers_vq_state(DIFFUSERS_SPATIAL).items()}
    assert any(".proj_attn." in k for k in old)
    directory = tmp_path / "old"
    directory.mkdir()
    shutil.copy(tmp_path / "spatial" / "config.json", directory / "config.json")
    torch.save(old, directory / "diffusion_pytorch_model.bin")
    tok = convert_diffusers(load_original_checkpoint(directory), checkpoint_path=directory)
    assert tok.config == modern.config
    assert all(torch.equal(v, modern.state_dict()[k]) for k, v in tok.state_dict().items())


def test_an_amused_pipelines_vqvae_gets_its_0_1_pixel_range_and_stays_on_imagetoks_range(tmp_path):
    """aMUSEd feeds its VQ-GAN [0, 1] images (no normalisation) and clips its decode to [0, 1]: found from
    the pipeline's model_index.json one directory up; Tokenizer.encode/decode still take and give [-1, 1]."""
    (tmp_path / "amused").mkdir()
    (tmp_path / "amused" / "model_index.json").write_text('{"_class_name": "AmusedPipeline", "vqvae": ["diffusers", "VQModel"]}')
    directory = diffusers_vq_directory(tmp_path / "amused" / "vqvae", DIFFUSERS_SMALL)
    tok = convert_diffusers(load_original_checkpoint(directory), checkpoint_path=directory)
    assert tok.config["encoder"]["pixel_range"] == tok.config["decoder"]["pixel_range"] == [0.0, 1.0]
    images = _images()
    ref_idx, ref_images = reference(diffusers_vq_state(DIFFUSERS_SMALL), (images + 1) * 0.5, 8)
    idx = tok.encode(images)
    assert torch.equal(idx[..., 0], ref_idx)
    torch.testing.assert_close(tok.decode(idx), ref_images * 2 - 1, atol=2e-5, rtol=1e-5)
    told = convert_diffusers(load_original_checkpoint(directory), checkpoint_path=directory, pixel_range=[-1, 1])
    assert "pixel_range" not in told.config["encoder"]  # imagetok's own range: no mapping at all
    with pytest.raises(CheckpointError, match=r"pixel_range=\[0, 255\] is invalid: allowed values are \[0,1\]"):
        convert_diffusers(load_original_checkpoint(directory), checkpoint_path=directory, pixel_range=[0, 255])


def test_a_pipeline_directory_is_refused_naming_its_vqmodel_folder(tmp_path):
    (tmp_path / "amused").mkdir()
    (tmp_path / "amused" / "model_index.json").write_text(
        '{"_class_name": "AmusedPipeline", "vqvae": ["diffusers", "VQModel"], "transformer": ["diffusers", "UVit2DModel"]}')
    diffusers_vq_directory(tmp_path / "amused" / "vqvae")
    with pytest.raises(CheckpointError) as refused:
        load_original_checkpoint(tmp_path / "amused")
    assert str(refused.value) == (f"{tmp_path / 'amused'} is a diffusers pipeline, not one model: convert its VQModel "
                                  f"folder: checkpoint={tmp_path / 'amused' / 'vqvae'}")
