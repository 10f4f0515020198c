"""``from=titok``: small checkpoints in bytedance/1d-tokenizer TiTok's own key layout (random weights,
64-wide, 16x16 images) convert into Tokenizers whose encode/decode equal an independent functional
forward pass written here from TiTok's structure (CLIP blocks with bmm attention, the legacy reshape,
TiTok's distance formula, MaskGIT-VQGAN's decoder with its output-side shortcut); the variants imagetok
cannot express are one ``error:`` line through the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from foreign_checkpoints import TITOK, titok_state
from imagetok import Tokenizer
from imagetok.export.converters import convert_titok
from test_cli_errors import _entry_points, _error_lines, _run_in_process


# --- TiTok's forward pass, functionally ------------------------------------------------------------
def _ln(s, p, x):
    return F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-5)


def _lin(s, p, x):
    w = s[f"{p}.weight"]
    return F.linear(x, w.reshape(w.shape[0], -1), s.get(f"{p}.bias"))


def _block(s, p, x):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1 x), x + mlp(ln_2 x); 64-wide heads."""
    b, length, width = x.shape
    heads = width // 64
    q, k, v = F.linear(_ln(s, f"{p}.ln_1", x), s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(b, length, heads, -1).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    x = x + _lin(s, f"{p}.attn.out_proj", a.transpose(1, 2).reshape(b, length, width))
    return x + _lin(s, f"{p}.mlp.c_proj", F.gelu(_lin(s, f"{p}.mlp.c_fc", _ln(s, f"{p}.ln_2", x))))


def _vit(s, part, x):
    x = _ln(s, f"{part}.ln_pre", x)
    for i in range(len({k.split(".")[2] for k in s if k.startswith(f"{part}.transformer.")})):
        x = _block(s, f"{part}.transformer.{i}", x)
    return x


def _gn(s, p, x):
    return F.group_norm(x, 32, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-6)


def _conv(s, p, x, pad=1):
    return F.conv2d(x, s[f"{p}.weight"], s.get(f"{p}.bias"), padding=pad)


def _maskgit_res(s, p, x):
    h = _conv(s, f"{p}.conv1", F.silu(_gn(s, f"{p}.norm1", x)))
    h = _conv(s, f"{p}.conv2", F.silu(_gn(s, f"{p}.norm2", h)))
    return h + (_conv(s, f"{p}.nin_shortcut", h, pad=0) if f"{p}.nin_shortcut.weight" in s else x)


def _maskgit_decoder(s, z):
    h = _maskgit_res(s, "pixel_decoder.mid.0", _conv(s, "pixel_decoder.conv_in", z))
    for i in reversed(range(len(TITOK["pixel_mult"]))):
        h = _maskgit_res(s, f"pixel_decoder.up.{i}.block.0", h)
        if i > 0:
            h = _conv(s, f"pixel_decoder.up.{i}.upsample_conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(s, "pixel_decoder.conv_out", F.silu(_gn(s, "pixel_decoder.norm_out", h)))


def reference(s, x, kind):
    """(indices [B, N], reconstruction in [-1, 1]) of TiTok's encode / decode_tokens for images x in [-1, 1]."""
    legacy, b, n, patch = kind == "proxy", x.shape[0], TITOK["tokens"], TITOK["patch"]
    patches = F.conv2d((x + 1) / 2, s["encoder.patch_embed.weight"], s["encoder.patch_embed.bias"], stride=patch)
    h = torch.cat([s["encoder.class_embedding"].expand(b, 1, -1), patches.flatten(2).transpose(1, 2)], 1)
    latents = (s["latent_tokens"] + s["encoder.latent_token_positional_embedding"]).expand(b, -1, -1)
    h = _vit(s, "encoder", torch.cat([h + s["encoder.positional_embedding"], latents], 1))
    h = _ln(s, "encoder.ln_post", h[:, -n:])  # [B, N, W]
    h = h.reshape(b, -1, n) if legacy else h.transpose(1, 2)  # is_legacy: a reshape, no transpose -> [B, W, N]
    z = torch.einsum("oc,bcn->bno", s["encoder.conv_out.weight"][:, :, 0, 0], h) + s["encoder.conv_out.bias"]
    codes = s["quantize.embedding.weight"]
    if legacy:  # use_l2_norm, as in the VQ-4096 releases
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    d = (z**2).sum(-1, keepdim=True) + (codes**2).sum(-1) - 2 * z @ codes.t()
    ids = d.argmin(-1)  # [B, N]
    h = _lin(s, "decoder.decoder_embed", codes[ids]) + s["decoder.latent_token_positional_embedding"]
    grid = TITOK["resolution"] // patch
    masks = torch.cat([s["decoder.class_embedding"].expand(b, 1, -1), s["decoder.mask_token"].expand(b, grid**2, -1)], 1)
    h = _ln(s, "decoder.ln_post", _vit(s, "decoder", torch.cat([masks + s["decoder.positional_embedding"], h], 1))[:, 1 : 1 + grid**2])
    if legacy:
        logits = _lin(s, "decoder.ffn.2", torch.tanh(_lin(s, "decoder.ffn.0", h)))  # [B, P, 1024-like]
        soft = logits.softmax(-1) @ s["pixel_quantize.embedding.weight"]  # [B, P, D]
        image = _maskgit_decoder(s, soft.transpose(1, 2).reshape(b, -1, grid, grid))
    else:
        pixels = _lin(s, "decoder.ffn.0", h).reshape(b, grid, grid, patch, patch, 3)
        image = _conv(s, "decoder.conv_out", pixels.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, grid * patch, grid * patch))
    return ids, image * 2 - 1


def _images(n=2):
    return torch.rand(n, 3, TITOK["resolution"], TITOK["resolution"], generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.parametrize("kind", ["proxy", "pixels"])
def test_converted_titok_matches_the_original_forward(kind):
    state, x = titok_state(kind), _images()
    tok = convert_titok(state)
    expected_ids, expected = reference(state, x, kind)
    ids = tok.encode(x)
    assert ids.shape == (2, TITOK["tokens"], 1) and tok.codebook_sizes == [TITOK["codes"]]
    assert torch.equal(ids[..., 0], expected_ids)
    decoded = tok.decode(ids)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, expected, atol=1e-4, rtol=1e-4)
    assert tok.is_sequence and tok.token_shape(16) == (TITOK["tokens"], 1)


def test_a_converted_titok_round_trips_through_save_pretrained(tmp_path):
    tok, x = convert_titok(titok_state("proxy")), _images()
    tok.save_pretrained(tmp_path / "titok")
    loaded = Tokenizer.from_pretrained(tmp_path / "titok")
    assert loaded.config == tok.config and loaded.config["decoder"]["_target_"].endswith("ProxyCodeDecoder")
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def _export(monkeypatch, capsys, args: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["export", *args])
    _entry_points()["export"]()
    output = capsys.readouterr()
    return output.out + output.err


def test_auto_detects_a_released_bin_and_a_hub_safetensors_with_its_config(tmp_path, monkeypatch, capsys):
    """The ``.bin`` releases (a bare state dict) and the Hub's ``model.safetensors`` + ``config.json``."""
    torch.save(titok_state("proxy"), tmp_path / "tokenizer_titok.bin")
    output = _export(monkeypatch, capsys, ["from=auto", f"checkpoint={tmp_path / 'tokenizer_titok.bin'}", f"out={tmp_path / 'a'}"])
    assert f"from=auto: {tmp_path / 'tokenizer_titok.bin'} is a checkpoint in the titok format" in output
    expected = convert_titok(titok_state("proxy"))
    converted = Tokenizer.from_pretrained(tmp_path / "a")
    assert converted.config == expected.config
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in converted.state_dict().items())

    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in titok_state("pixels").items()}, str(hub / "model.safetensors"))
    vq = {"codebook_size": TITOK["codes"], "token_size": TITOK["token_size"], "use_l2_norm": True, "is_legacy": False,
          "finetune_decoder": False, "num_latent_tokens": TITOK["tokens"]}
    (hub / "config.json").write_text(json.dumps({"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": 16}}}))
    _export(monkeypatch, capsys, ["from=titok", f"checkpoint={hub / 'model.safetensors'}", f"config={hub / 'config.json'}",
                                  f"out={tmp_path / 'b'}"])
    converted = Tokenizer.from_pretrained(tmp_path / "b")
    # use_l2_norm is not in the tensors: the config's value wins over the release default (off for a pixel head)
    assert converted.config["quantizer"]["l2_normalize"] is True
    assert converted.config["decoder"]["head"] == "pixels" and not converted.config["encoder"]["legacy_token_layout"]


@pytest.mark.parametrize("kind,says", [
    ("vae", "a TiTok VAE checkpoint (quantize_mode: vae, no quantize.embedding.weight) has continuous tokens"),
    ("stage1", "a stage-1 TiTok checkpoint (its decoder predicts MaskGIT-VQGAN codes, but there is no pixel_decoder.*"),
    ("tatitok", "a TA-TiTok checkpoint (decoder.text_guidance_*: the decoder is conditioned on text) is not supported"),
])
def test_variants_imagetok_cannot_express_are_one_line(tmp_path, monkeypatch, capsys, kind, says):
    path = tmp_path / f"{kind}.bin"
    torch.save(titok_state(kind), path)
    for source in ("titok", "auto"):
        output = _run_in_process(monkeypatch, capsys, "export", [f"from={source}", f"checkpoint={path}", f"out={tmp_path / 'o'}"])
        (line,) = _error_lines(output)
        assert line.split("error: ", 1)[1].startswith(f"{path} (titok): {says}") and "Traceback" not in output


def test_a_config_that_contradicts_the_tensors_is_one_line(tmp_path, monkeypatch, capsys):
    path, config = tmp_path / "titok.bin", tmp_path / "titok_l32.yaml"
    torch.save(titok_state("proxy"), path)
    for text, says in (("model:\n  vq_model:\n    codebook_size: 4096\n    use_l2_norm: true\n",
                        f"the config's model.vq_model.codebook_size=4096 does not fit the checkpoint's tensors ({TITOK['codes']})"),
                       ("model:\n  vq_model:\n    vit_enc_model_size: large\n",
                        "the config's model.vq_model.vit_enc_model_size='large' does not fit the checkpoint's 64-wide tensors"),
                       ("model:\n  vq_model: {}\ndataset:\n  preprocessing:\n    crop_size: 256\n",
                        "the config's dataset.preprocessing.crop_size=256 does not fit the checkpoint's position tables (16px images)"),
                       ("experiment: {}\n", f"{config} is not a TiTok config: no model.vq_model")):
        config.write_text(text)
        output = _run_in_process(monkeypatch, capsys, "export", ["from=titok", f"checkpoint={path}", f"config={config}",
                                                                 f"out={tmp_path / 'o'}"])
        (line,) = _error_lines(output)
        assert line.endswith(says)
