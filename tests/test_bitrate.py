"""Bits per pixel: the raw capacity of a tokenizer's tokens (positions x sum of log2 codebook sizes) over
the image's pixels, on tokenizers of known shapes, and in evaluate's metrics.json and summary.md
(per prefix length for a variable-length 1D tokenizer)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS
from imagetok import Tokenizer
from imagetok.evaluation.bitrate import token_bitrate
from imagetok.training.run import tokenizer_config


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


NARROW = ["encoder.ch=8", "encoder.z_channels=8"]  # the default grid and codebook, fewer channels: fast


def _tokenizer(overrides: list[str]) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_config(tokenizer_config(_compose("train", overrides))).eval()


def test_bits_per_pixel_of_known_grids():
    assert token_bitrate((8, 8, 1), [1024], 32) == {"tokens_per_image": 64, "sub_tokens_per_token": 1,
                                                    "bits_per_pixel": 0.625}
    assert token_bitrate((8, 8, 2), [512, 512], 32)["bits_per_pixel"] == 64 * 18 / 1024 == 1.125
    assert token_bitrate((16, 16, 1), [16384], 256)["bits_per_pixel"] == 256 * 14 / 65536
    # exact log2, not whole bits: an FSQ code of 8*5*5*5 = 1000 levels carries 9.97 bits
    assert token_bitrate((8, 8, 1), [1000], 32)["bits_per_pixel"] == pytest.approx(64 * math.log2(1000) / 1024, rel=1e-15)
    with pytest.raises(ValueError, match="2 sub-tokens per position but 1 codebook sizes"):
        token_bitrate((8, 8, 2), [1024], 32)


@pytest.mark.parametrize("overrides,shape,sizes,bpp", [
    (NARROW, (8, 8, 1), [1024], 0.625),                               # the default: 8x8 grid of 1024 codes at 32 px
    (["experiment=cpu_lfq", *NARROW], (8, 8, 2), [512, 512], 1.125),  # LFQ, 18 bits as 2 sub-tokens of 512
])
def test_the_recipes_token_shapes_give_their_bits_per_pixel(overrides, shape, sizes, bpp):
    tok = _tokenizer(overrides)
    with torch.no_grad():
        ids = tok.encode(torch.zeros(1, 3, 32, 32))
    assert tuple(ids.shape[1:]) == tok.token_shape(32) == shape and tok.codebook_sizes == sizes
    assert token_bitrate(tok.token_shape(32), tok.codebook_sizes, 32)["bits_per_pixel"] == bpp


def _evaluate(tok: Tokenizer, tmp_path, extra: list[str]) -> tuple[dict, str]:
    from imagetok.evaluation.run import evaluate

    tok.save_pretrained(tmp_path / "tok")
    cfg = _compose("evaluate", [f"checkpoint={tmp_path / 'tok'}", "eval.metrics=[psnr]", "eval.num_images=4",
                                "eval.batch_size=4", *extra])
    evaluate(cfg, tmp_path / "eval")
    return json.loads((tmp_path / "eval" / "metrics.json").read_text()), (tmp_path / "eval" / "summary.md").read_text()


def test_evaluate_writes_tokens_per_image_and_bits_per_pixel(tmp_path):
    metrics, summary = _evaluate(_tokenizer(NARROW), tmp_path, [])
    assert metrics["tokens_per_image"] == 64 and metrics["sub_tokens_per_token"] == 1 and metrics["bits_per_pixel"] == 0.625
    assert metrics["protocol"]["bits_per_pixel"].startswith("bits_per_pixel = tokens_per_image * sum over sub-tokens")
    assert "| tokens per image | 64 x 1 sub-token |" in summary and "| bits per pixel | 0.6250 |" in summary
    assert "bits_per_pixel_vs_tokens" not in metrics  # a grid: no prefixes


def test_evaluate_gives_bits_per_pixel_at_every_prefix_of_a_variable_length_tokenizer(tmp_path):
    tok = _tokenizer(["experiment=cpu_flextok", "encoder.width=32", "encoder.depth=1", "encoder.num_heads=2",
                      "encoder.num_latent_tokens=8", "data.image_size=16"])
    assert tok.variable_length and tok.token_shape(16) == (8, 1)
    metrics, summary = _evaluate(tok, tmp_path, ["data.image_size=16"])
    per_token = math.log2(tok.codebook_sizes[0])
    assert metrics["tokens_per_image"] == 8 and metrics["bits_per_pixel"] == pytest.approx(8 * per_token / 256, rel=1e-15)
    assert list(metrics["bits_per_pixel_vs_tokens"]) == list(metrics["psnr_vs_tokens"]) == ["1", "2", "4", "8"]
    assert metrics["bits_per_pixel_vs_tokens"]["2"] == pytest.approx(2 * per_token / 256, rel=1e-15)
    assert metrics["bits_per_pixel_vs_tokens"]["8"] == metrics["bits_per_pixel"]
    assert f"| PSNR, first 2 tokens (dB) | {metrics['psnr_vs_tokens']['2']:.2f} at {2 * per_token / 256:.4f} bpp |" in summary


@pytest.mark.parametrize("recipe,tokens,scales", [("cpu_rq", [64, 128, 192, 256], None),
                                                  ("cpu_var", [1, 5, 14, 30, 66, 130], [1, 2, 3, 4, 6, 8])])
def test_evaluate_gives_quality_at_every_depth_of_residual_and_every_scale_of_multiscale_tokens(tmp_path, recipe,
                                                                                                 tokens, scales):
    """Residual VQ decodes its first d levels, VAR its first m scales: PSNR and bits per pixel of each
    prefix, keyed by the sub-tokens it keeps; all of them is exactly the full reconstruction."""
    tok = _tokenizer([f"experiment={recipe}", *NARROW])
    metrics, summary = _evaluate(tok, tmp_path, [])
    assert list(metrics["psnr_vs_tokens"]) == list(metrics["bits_per_pixel_vs_tokens"]) == [str(t) for t in tokens]
    assert metrics["psnr_vs_tokens"][str(tokens[-1])] == metrics["psnr"]
    assert metrics["bits_per_pixel_vs_tokens"][str(tokens[-1])] == pytest.approx(metrics["bits_per_pixel"], rel=1e-12)
    kinds = {p["kind"] for p in metrics["prefixes"]}
    assert kinds == {"depth" if scales is None else "scales"}
    assert [p["n"] for p in metrics["prefixes"]] == list(range(1, len(tokens) + 1))
    label = metrics["prefixes"][1]["label"]
    assert label == ("first 2 of 4 levels (128 tokens)" if scales is None else "first 2 of 6 scales (5 tokens)")
    assert f"| PSNR, {label} (dB) |" in summary
    assert (tmp_path / "eval" / "psnr_vs_tokens.png").stat().st_size > 0
