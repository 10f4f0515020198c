"""Converters: checkpoints in taming-transformers' and LlamaGen's own key layouts (random weights, small
widths) convert into Tokenizers whose encode/decode equal an independent functional forward pass
written here from the original projects' structure (bmm attention, their distance formula)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS
from foreign_checkpoints import BLOCKS, CH_MULT, DIM, K, llamagen_state, taming_state
from imagetok import Tokenizer
from imagetok.export.converters import convert_llamagen, convert_taming
from imagetok.export.run import export


# --- the original forward passes, functionally -------------------------------------------------------
def _conv(s, p, x, pad=1, stride=1):
    return F.conv2d(x, s[f"{p}.weight"], s[f"{p}.bias"], stride=stride, padding=pad)


def _norm(s, p, x):
    return F.group_norm(x, 32, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(s, p, x):
    h = _conv(s, f"{p}.conv1", _swish(_norm(s, f"{p}.norm1", x)))
    h = _conv(s, f"{p}.conv2", _swish(_norm(s, f"{p}.norm2", h)))
    return (_conv(s, f"{p}.nin_shortcut", x, pad=0) if f"{p}.nin_shortcut.weight" in s else x) + h


def _attn(s, p, x):
    h = _norm(s, f"{p}.norm", x)
    q, k, v = (_conv(s, f"{p}.{n}", h, pad=0) for n in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    out = torch.bmm(v.reshape(b, c, -1), F.softmax(w, dim=2).permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(s, f"{p}.proj_out", out, pad=0)


def _level(s, p, x, inner, blocks, resample):
    for j in range(blocks):
        x = _res(s, f"{p}.{inner}.{j}", x)
        if f"{p}.attn.{j}.q.weight" in s:
            x = _attn(s, f"{p}.attn.{j}", x)
    if resample == "down" and f"{p}.downsample.conv.weight" in s:
        x = _conv(s, f"{p}.downsample.conv", F.pad(x, (0, 1, 0, 1)), pad=0, stride=2)
    if resample == "up" and f"{p}.upsample.conv.weight" in s:
        x = _conv(s, f"{p}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return x


def reference(s, x, layout):
    """(latents before quantization [B, h, w, C], indices [B, h, w], quantized latents [B, h, w, C],
    reconstruction [B, 3, H, W]) as the original project computes them."""
    taming = layout == "taming"
    mid = ("mid.block_1", "mid.attn_1", "mid.block_2") if taming else ("mid.0", "mid.1", "mid.2")
    h = _conv(s, "encoder.conv_in", x)
    for i in range(len(CH_MULT)):
        h = _level(s, f"encoder.{'down' if taming else 'conv_blocks'}.{i}", h, "block" if taming else "res", BLOCKS, "down")
    h = _attn(s, f"encoder.{mid[1]}", _res(s, f"encoder.{mid[0]}", h))
    h = _conv(s, "encoder.conv_out", _swish(_norm(s, "encoder.norm_out", _res(s, f"encoder.{mid[2]}", h))))
    z = latents = _conv(s, "quant_conv", h, pad=0).permute(0, 2, 3, 1)
    codes = s["quantize.embedding.weight"]
    if not taming:
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
    idx = d.argmin(1)
    z_q = codes[idx].reshape(z.shape)
    h = _conv(s, "post_quant_conv", z_q.permute(0, 3, 1, 2), pad=0)
    h = _conv(s, "decoder.conv_in", h)
    h = _res(s, f"decoder.{mid[2]}", _attn(s, f"decoder.{mid[1]}", _res(s, f"decoder.{mid[0]}", h)))
    n = len(CH_MULT)
    for step in range(n):  # lowest resolution first
        p = f"decoder.up.{n - 1 - step}" if taming else f"decoder.conv_blocks.{step}"
        h = _level(s, p, h, "block" if taming else "res", BLOCKS + 1, "up")
    out = _conv(s, "decoder.conv_out", _swish(_norm(s, "decoder.norm_out", h)))
    return latents, idx.reshape(z.shape[:3]), z_q, out


@pytest.mark.parametrize("layout", ["taming", "llamagen"])
def test_converted_tokenizer_matches_the_original_forward(layout):
    state = taming_state() if layout == "taming" else llamagen_state()
    tok = (convert_taming({"state_dict": state}) if layout == "taming" else convert_llamagen({"model": state}))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents, expected_idx, expected_zq, expected = reference(state, x, layout)
        ids = tok.encode(x)
        assert torch.equal(ids[..., 0], expected_idx)
        ours = tok.quant_conv(tok.encoder(x)).permute(0, 2, 3, 1)
        assert (ours - latents).abs().max() < 1e-5, float((ours - latents).abs().max())
        assert (tok.indices_to_latents(ids).permute(0, 2, 3, 1) - expected_zq).abs().max() < 1e-6
        recon = tok.decode(ids)
        assert torch.equal(recon, tok(x)[0])  # decode(encode(x)) is the forward's reconstruction
    assert (recon - expected).abs().max() < 1e-4, float((recon - expected).abs().max())
    assert tok.codebook_sizes == [K] and tok.downsample_factor == 2


def test_export_cli_converts_and_refuses_unknown_sources(tmp_path):
    torch.save({"model": llamagen_state()}, tmp_path / "vq_ds16_c2i.pt")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("export", overrides=["from=llamagen", f"checkpoint={tmp_path / 'vq_ds16_c2i.pt'}", f"out={tmp_path / 'out'}"])
        bad = compose("export", overrides=["from=maskgit", f"checkpoint={tmp_path / 'vq_ds16_c2i.pt'}", f"out={tmp_path / 'o'}"])
    out = export(cfg)
    tok = Tokenizer.from_pretrained(out)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(tok.encode(x)[..., 0], reference(llamagen_state(), x, "llamagen")[1])
    assert "converted from the llamagen checkpoint" in (out / "README.md").read_text()
    from imagetok.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="from='maskgit'"):
        export(bad)


class ModelCheckpoint:
    """Stands in for the Lightning callback class that old taming checkpoints pickle as a dict key."""

    def __init__(self) -> None:
        self.best_model_score = 1.0


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_pickled_foreign_objects_are_never_built_and_code_is_refused(tmp_path, caplog):
    import argparse

    state = taming_state()
    torch.save({"state_dict": state, "callbacks": {ModelCheckpoint: {"best": 1.0}}, "trainer": ModelCheckpoint(),
                "hyper_parameters": argparse.Namespace(embed_dim=DIM)}, tmp_path / "last.ckpt")
    from imagetok.export.converters import load_original_checkpoint

    loaded = load_original_checkpoint(tmp_path / "last.ckpt")
    assert not isinstance(loaded["trainer"], ModelCheckpoint)  # an inert placeholder, not the class
    assert "argparse.Namespace" in caplog.text and "only its tensors are used" in caplog.text
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(convert_taming(loaded).encode(x)[..., 0], reference(state, x, "taming")[1])

    torch.save({"state_dict": state, "payload": _RunsCode()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_original_checkpoint(tmp_path / "evil.ckpt")
