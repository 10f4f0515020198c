"""CNN encoder/decoder and the Tokenizer wiring."""

from __future__ import annotations

import pytest
import torch

from imagetok.errors import ConfigValueError
from imagetok.nets.cnn import Decoder, Encoder
from imagetok.tokenizer import Tokenizer

SMALL = {"ch": 8, "num_res_blocks": 1, "z_channels": 16}


@pytest.mark.parametrize("ch_mult", [[1], [1, 2], [1, 2, 2], [1, 1, 2, 2]])
def test_any_power_of_two_downsampling(ch_mult):
    f = 2 ** (len(ch_mult) - 1)
    enc = Encoder(**SMALL, ch_mult=ch_mult, attn_resolutions=[32 // f], resolution=32)
    dec = Decoder(**SMALL, ch_mult=ch_mult, attn_resolutions=[32 // f], resolution=32)
    z = enc(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 16, 32 // f, 32 // f)
    assert dec(z).shape == (2, 3, 32, 32)
    assert len(enc.down[-1].attn) == 1 and len(dec.up[-1].attn) == 2  # attention at the lowest level


def test_resolution_not_divisible_is_refused():
    with pytest.raises(ConfigValueError, match="resolution=30.*multiple of the downsampling factor 4"):
        Encoder(**SMALL, ch_mult=[1, 2, 2], resolution=30)


def tiny_tokenizer() -> Tokenizer:
    net = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8, "resolution": 16}
    return Tokenizer.from_config({
        "encoder": {"_target_": "imagetok.nets.cnn.Encoder", **net},
        "decoder": {"_target_": "imagetok.nets.cnn.Decoder", **net},
        "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": 4, "codebook_size": 64},
    })


def test_tokenizer_encode_decode_matches_forward_in_eval():
    tok = tiny_tokenizer().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    assert ids.shape == (2, 8, 8, 1) and tok.token_shape(16) == (8, 8, 1)
    recon, _ = tok(x)
    assert torch.equal(tok.decode(ids), recon)
    assert tok.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def test_from_config_refuses_foreign_targets():
    with pytest.raises(ConfigValueError, match="encoder._target_.*imagetok package"):
        Tokenizer.from_config({"encoder": {"_target_": "os.system", "command": "true"}, "quantizer": {}, "decoder": {}})


@pytest.mark.parametrize("target", ["imagetok.training.run.instantiate",  # imported into imagetok, not defined there
                                    "imagetok.utils.build.importlib",      # a module, not a class
                                    "imagetok.errors.ConfigValueError"])   # an imagetok class, but not a torch module
def test_from_config_refuses_names_that_merely_live_in_imagetok(target):
    with pytest.raises(ConfigValueError, match="torch module class defined inside the imagetok package"):
        Tokenizer.from_config({"encoder": {"_target_": target}, "quantizer": {}, "decoder": {}})


def test_from_config_refuses_interpolations():
    config = {"encoder": {"_target_": "imagetok.nets.cnn.Encoder", "ch": "${oc.create:{_target_: os.system}}"},
              "quantizer": {}, "decoder": {}}
    with pytest.raises(ConfigValueError, match="encoder.ch=.*plain value"):
        Tokenizer.from_config(config)


def test_norm_groups_must_divide_every_width():
    with pytest.raises(ConfigValueError, match=r"norm_groups=12 is invalid: allowed values are null or a positive "
                                               r"integer dividing every width \[32, 64\]"):
        Encoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4, resolution=32, norm_groups=12)


def test_the_movq_decoder_config_trains_with_norms_conditioned_on_the_quantized_latent(compose_config):
    """``decoder=movq``: SpatialNorms see the quantized latent (not the post-quant one) and learn from it."""
    from imagetok.training.run import tokenizer_config

    cfg = compose_config(["decoder=movq", "data.image_size=32", "encoder.ch_mult=[1,2]", "encoder.attn_resolutions=[16]"])
    tok = Tokenizer.from_config(tokenizer_config(cfg))
    assert tok.decoder.conditioned_on_quantized and tok.decoder.norm_out.conv_y.in_channels == tok.quantizer.dim
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, out = tok(images)
    (recon - images).pow(2).mean().add(out.loss).backward()
    assert recon.shape == images.shape and tok.decoder.norm_out.conv_y.weight.grad.abs().sum() > 0
    tok.eval()
    with torch.no_grad():
        assert torch.equal(tok.decode(tok.encode(images)), tok(images)[0])


def test_pixel_range_maps_imagetoks_images_onto_the_nets_range_and_back():
    nets = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4, "resolution": 32}
    torch.manual_seed(0)
    plain, unit = Encoder(**nets), Encoder(**nets, pixel_range=[0, 1])
    unit.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(unit(x), plain((x + 1) * 0.5))
    decoder, unit_decoder = Decoder(**nets), Decoder(**nets, pixel_range=[0, 1])
    unit_decoder.load_state_dict(decoder.state_dict())
    z = torch.randn(1, 4, 16, 16)
    assert torch.equal(unit_decoder(z), decoder(z) * 2 - 1)
    with pytest.raises(ConfigValueError, match=r"pixel_range=\[1, 0\] is invalid: allowed values are \[low, high\]"):
        Encoder(**nets, pixel_range=[1, 0])
