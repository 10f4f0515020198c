"""Hybrid CNN + transformer 1D latent tokens (GigaTok, ``nets/hybrid.py``): shapes, every ``[B, N, C]``
quantizer family, prefix encoding and decoding, causal tokens, token drop, save/load, the CLI recipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from imagetok import Tokenizer
from imagetok.errors import ConfigValueError
from imagetok.nets.hybrid import HybridLatentTokenDecoder, HybridLatentTokenEncoder
from imagetok.quantizers.bsq import BinarySphericalQuantizer
from imagetok.quantizers.fsq import FiniteScalarQuantizer
from imagetok.quantizers.lfq import LookupFreeQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.quantizers.vq import VectorQuantizer

# 16px images, CNN f4 -> a 4x4 grid of 32-d features, 8 latent tokens of 8 channels
NET = {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "width": 32, "depth": 1, "num_heads": 2, "z_channels": 8,
       "resolution": 16, "num_latent_tokens": 8}


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _hybrid(quantizer=None, causal: bool = False, token_drop: str = "none", pos_embed: str = "learned") -> Tokenizer:
    torch.manual_seed(0)
    quantizer = quantizer if quantizer is not None else VectorQuantizer(dim=8, codebook_size=16)
    tok = Tokenizer(HybridLatentTokenEncoder(**NET, causal=causal, pos_embed=pos_embed), quantizer,
                    HybridLatentTokenDecoder(**NET, token_drop=token_drop, pos_embed=pos_embed))
    return tok.eval()


def test_hybrid_nets_map_images_to_1d_tokens_through_a_cnn_grid(one_thread):
    enc, dec = HybridLatentTokenEncoder(**NET), HybridLatentTokenDecoder(**NET)
    x = _images()
    assert tuple(enc.cnn(x).shape) == (3, 32, 4, 4)  # the CNN's feature grid, width channels
    z = enc(x)
    assert tuple(z.shape) == (3, 8, 8) and enc.token_layout == dec.token_layout == "sequence"
    assert enc.downsample_factor == 4 and dec.grid == (4, 4)
    assert tuple(dec(z).shape) == tuple(dec(z[:, :3]).shape) == (3, 3, 16, 16)  # any prefix -> a full image
    assert dec.last_layer is dec.cnn.conv_out.weight
    with pytest.raises(ConfigValueError, match="latent tokens"):
        dec(torch.randn(1, 9, 8))
    with pytest.raises(ConfigValueError, match="num_heads"):
        HybridLatentTokenEncoder(**{**NET, "num_heads": 3})
    with pytest.raises(ConfigValueError, match="ch_mult"):
        HybridLatentTokenDecoder(**{**NET, "ch_mult": []})


@pytest.mark.parametrize("make_quantizer,k", [
    (lambda: VectorQuantizer(dim=8, codebook_size=16), 1),
    (lambda: ResidualVectorQuantizer(dim=8, codebook_size=16, depth=3), 3),
    (lambda: FiniteScalarQuantizer(dim=4, levels=[8, 5, 5, 5]), 1),
    (lambda: LookupFreeQuantizer(dim=8, bits=8, bits_per_token=4), 2),
    (lambda: BinarySphericalQuantizer(dim=8, bits=8, bits_per_token=8), 1),
])
def test_every_quantizer_family_takes_hybrid_tokens_and_prefixes_decode(one_thread, make_quantizer, k):
    tok = _hybrid(make_quantizer(), token_drop="pow2")
    x = _images()
    recon, out = tok(x)
    assert out.indices.shape == (3, 8, k) and tok.token_shape(16) == (8, k) and tok.variable_length
    assert torch.equal(tok.decode(tok.encode(x)), recon)
    ids = tok.encode(x, num_tokens=3)
    assert torch.equal(ids, out.indices[:, :3]) and tok.decode(ids).shape == x.shape


def test_hybrid_causal_tokens_do_not_depend_on_later_tokens(one_thread):
    x = _images()
    for causal in (True, False):
        enc = _hybrid(causal=causal).encoder
        before = enc(x)
        with torch.no_grad():
            enc.latent_tokens[5:] += torch.randn(3, 32)
        after = enc(x)
        assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6) == causal


def test_hybrid_token_drop_masks_exactly_like_decoding_a_prefix(one_thread, monkeypatch):
    decoder = _hybrid(token_drop="uniform").decoder
    z = torch.randn(3, 8, 8)
    kept = torch.tensor([1, 4, 8])
    monkeypatch.setattr(decoder, "draw_kept_tokens", lambda b, k, device: kept)
    masked = decoder.train()(z)  # group norms are per sample, so samples stay independent in train mode
    decoder.eval()
    for i, k in enumerate(kept.tolist()):
        assert torch.allclose(masked[i], decoder(z[i : i + 1, :k])[0], atol=1e-5)
    assert decoder.prefix_lengths(8) == list(range(1, 9))
    assert HybridLatentTokenDecoder(**NET, token_drop="pow2").prefix_lengths(8) == [1, 2, 4, 8]
    with pytest.raises(ConfigValueError, match="token_drop"):
        HybridLatentTokenDecoder(**NET, token_drop="half")


def test_hybrid_tokenizer_saves_and_loads(one_thread, tmp_path):
    tok = _hybrid(FiniteScalarQuantizer(dim=4, levels=[8, 5, 5, 5]), causal=True, token_drop="pow2", pos_embed="rope")
    tok.config = {
        "encoder": {"_target_": "imagetok.nets.hybrid.HybridLatentTokenEncoder", **NET, "causal": True, "pos_embed": "rope"},
        "quantizer": {"_target_": "imagetok.quantizers.fsq.FiniteScalarQuantizer", "dim": 4, "levels": [8, 5, 5, 5]},
        "decoder": {"_target_": "imagetok.nets.hybrid.HybridLatentTokenDecoder", **NET, "token_drop": "pow2",
                    "pos_embed": "rope"}}
    tok.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    x = _images()
    ids = loaded.encode(x)
    assert loaded.variable_length and torch.equal(ids, tok.encode(x))
    assert torch.equal(loaded.decode(ids[:, :2]), tok.decode(ids[:, :2]))


def test_cpu_hybrid_recipe_trains_from_the_command_line(tmp_path):
    """``python train.py experiment=cpu_hybrid``, a few steps on 16px crops, then the checkpoint's
    tokens: 32 per image, any prefix decoding."""
    run_dir = tmp_path / "run"
    small = ["encoder.ch=8", "encoder.width=32", "encoder.depth=1", "encoder.num_heads=2", "data.image_size=16",
             "data.batch_size=4", "data.val_batch_size=4", "data.val_samples=4", "loss.discriminator.ch=8",
             "trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint.every_n_steps=4",
             "loss.disc_start=2", "cpu_threads=1"]
    proc = subprocess.run([sys.executable, "train.py", "experiment=cpu_hybrid", *small, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, IMAGETOK_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tok = Tokenizer.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert tok.token_shape(16) == (32, 1) and tok.variable_length
    x = _images(2)
    assert tok.decode(tok.encode(x, num_tokens=4)).shape == x.shape


def test_bad_hybrid_config_value_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "experiment=cpu_hybrid", "decoder.token_drop=half",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=120, env=dict(os.environ, IMAGETOK_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "decoder.token_drop" in proc.stderr + proc.stdout, proc.stderr[-2000:]
