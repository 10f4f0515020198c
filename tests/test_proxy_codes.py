"""``nets/proxy_codes.py``: a 1D tokenizer that decodes through a grid tokenizer's codes (TiTok's proxy
codes), built from ``_target_`` dicts with any 1D logits decoder and any grid decoder; and the
MaskGIT-VQGAN nets it is released with."""

from __future__ import annotations

import pytest
import torch

from imagetok import Tokenizer
from imagetok.errors import ConfigValueError

V, D, TOKENS = 32, 8, 6


def _config(train_codebook: bool = False, code_decoder: str = "latent_tokens") -> dict:
    vit = {"patch_size": 4, "width": 32, "depth": 1, "num_heads": 2, "z_channels": 4, "num_latent_tokens": TOKENS}
    code = ({"_target_": "imagetok.nets.latent_tokens.LatentTokenDecoder", **vit, "out_channels": V, "patch_size": 1,
             "resolution": 4} if code_decoder == "latent_tokens" else
            {"_target_": "imagetok.nets.titok.TiTokDecoder", **vit, "width": 64, "num_heads": 1, "resolution": 16,
             "head": "logits", "num_logits": V})
    return {"encoder": {"_target_": "imagetok.nets.latent_tokens.LatentTokenEncoder", **vit, "resolution": 16},
            "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": 4, "codebook_size": 16},
            "decoder": {"_target_": "imagetok.nets.proxy_codes.ProxyCodeDecoder", "codebook_size": V, "codebook_dim": D,
                        "train_codebook": train_codebook, "code_decoder": code,
                        "pixel_decoder": {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitDecoder", "ch": 16,
                                          "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": D}}}


@pytest.mark.parametrize("code_decoder", ["latent_tokens", "titok"])
def test_logits_soft_codes_and_pixels_have_the_documented_shapes(code_decoder):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config(code_decoder=code_decoder)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = tok.post_quant_conv(tok.indices_to_latents(tok.encode(x)))  # [B, N, z_channels]
    logits = tok.decoder.code_logits(z)
    assert logits.shape == (2, V, 4, 4)
    soft = tok.decoder.soft_codes(logits)
    assert soft.shape == (2, D, 4, 4)
    assert torch.equal(tok.decoder(z), tok.decoder.pixel_decoder(soft)) and tok.decode(tok.encode(x)).shape == x.shape
    # a softmax that is one-hot is the hard code: what a grid tokenizer's own codes decode from
    codes = torch.randint(V, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(codes, V).permute(0, 3, 1, 2).float() * 1e4
    torch.testing.assert_close(tok.decoder.soft_codes(one_hot), tok.decoder.codes_to_latents(codes))


def test_the_codebook_is_frozen_unless_asked_and_gradients_reach_the_code_decoder():
    torch.manual_seed(0)
    for train in (False, True):
        tok = Tokenizer.from_config(_config(train_codebook=train)).train()
        recon, out = tok(torch.rand(2, 3, 16, 16) * 2 - 1)
        (recon.square().mean() + out.loss).backward()
        assert tok.decoder.codebook.requires_grad is train and (tok.decoder.codebook.grad is not None) is train
        assert tok.decoder.code_decoder.to_pixels.weight.grad is not None
        assert tok.encoder.proj_out.weight.grad is not None


def test_a_proxy_code_tokenizer_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(_config()).eval()
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    ids = tok.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert loaded.config == tok.config and torch.equal(loaded.decode(ids), tok.decode(ids))


def test_parts_that_do_not_fit_the_codebook_are_refused_by_key():
    config = _config()
    config["decoder"]["pixel_decoder"]["z_channels"] = D + 1
    with pytest.raises(ConfigValueError, match=r"decoder.pixel_decoder.z_channels=9 is invalid: allowed values are codebook_dim=8"):
        Tokenizer.from_config(config)
    config = _config(code_decoder="titok")
    config["decoder"]["code_decoder"]["num_logits"] = V * 2
    with pytest.raises(ConfigValueError, match=r"decoder.code_decoder.num_logits=64 is invalid"):
        Tokenizer.from_config(config)


def test_maskgit_vqgan_nets_make_a_grid_tokenizer_in_unit_interval():
    torch.manual_seed(0)
    net = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8, "unit_interval": True}
    tok = Tokenizer.from_config({"encoder": {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitEncoder", **net},
                                 "decoder": {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitDecoder", **net},
                                 "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": 8,
                                               "codebook_size": 16}}).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tok.encode(x).shape == (2, 8, 8, 1) and tok.decode(tok.encode(x)).shape == x.shape
    with torch.no_grad():  # unit_interval: the nets see (x + 1) / 2 and their output y comes back as 2 y - 1
        z, y = tok.encoder(x), tok.decoder(tok.encoder(x))
        tok.encoder.unit_interval = tok.decoder.unit_interval = False
        assert torch.equal(z, tok.encoder((x + 1) * 0.5)) and torch.equal(y, tok.decoder(z) * 2 - 1)
