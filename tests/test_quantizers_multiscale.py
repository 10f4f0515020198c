"""VAR's multi-scale residual quantizer: the token maps and latents against an independent
re-computation of VAR's coarse-to-fine procedure, exact inverse lookup, index ranges and layout,
scale-map round trips, fp32/bf16 index equality, straight-through gradients, prefixes of whole scales
that reconstruct better scale by scale on held-out latents after a brief fit, clear config errors, and
the recipe training end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import train_recipe
from imagetok.errors import ConfigValueError
from imagetok.quantizers.multiscale import MultiScaleResidualQuantizer
from test_quantizers_rq_fsq import _latents
from test_train_variants import SAMPLE, TINY

SCALES = [1, 2, 3, 4]  # 1 + 4 + 9 + 16 = 30 tokens for the 4x4 latents of _latents


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _var_refiner(scale: int, num_scales: int, num_refiners: int) -> int:
    """VAR's choice of refiner (models/quant.py, ``PhiPartiallyShared``): K ticks evenly spaced from
    1/(3K) to 1 - 1/(3K) for K = 4, from 1/(2K) to 1 - 1/(2K) otherwise; scale ``si`` of ``SN`` asks for
    the tick nearest ``si / (SN - 1)`` (numpy float64, first index on an exact tie)."""
    margin = 1 / 3 / num_refiners if num_refiners == 4 else 1 / 2 / num_refiners
    ticks = np.linspace(margin, 1 - margin, num_refiners)
    return int(np.argmin(np.abs(ticks - scale / (num_scales - 1))))


def _var_reference(q: MultiScaleResidualQuantizer, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """VAR's procedure written out from the paper: for each scale, area-downsample the residual, take
    the nearest code (float64 distances), upsample the code map bicubically, refine it with VAR's
    choice of refiner ``phi``, add it. Returns the token maps, ``f_hat`` and VAR's loss."""
    codebook, r = q.vq.codebook.detach().double(), q.refine_ratio
    f = f.double()
    f_hat, maps, loss = torch.zeros_like(f), [], 0.0
    for k, side in enumerate(q.scales):
        conv = q.refiners[_var_refiner(k, len(q.scales), len(q.refiners))]
        residual = F.adaptive_avg_pool2d(f - f_hat, side)  # [B, C, s, s]
        flat = residual.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        token_map = torch.cdist(flat, codebook).argmin(1).reshape(f.shape[0], side, side)
        up = F.interpolate(codebook[token_map].permute(0, 3, 1, 2), size=f.shape[-2:], mode="bicubic", align_corners=False)
        phi = (1 - r) * up + r * F.conv2d(up, conv.weight.double(), conv.bias.double(), padding=1)
        f_hat = f_hat + phi
        maps.append(token_map)
        loss = loss + (q.beta + 1) * (f_hat - f).pow(2).mean()  # beta * commit + codebook term, same value
    return maps, f_hat, loss / len(q.scales)


def _fit(q: MultiScaleResidualQuantizer, steps: int) -> MultiScaleResidualQuantizer:
    """Train codebook and refiners with VAR's loss on clustered latents (codebook_update=loss)."""
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=3e-2)
    q.train()
    for step in range(steps):
        out = q(_latents(32, step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return q.eval()


@pytest.mark.parametrize("num_refiners", [1, 3])
def test_tokens_latents_and_loss_follow_vars_procedure_and_invert_exactly(num_refiners):
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(dim=8, codebook_size=32, scales=SCALES, num_refiners=num_refiners).eval()
    f = _latents(16, 3)
    out = q(f)
    assert q.codebook_sizes == [32] and q.sequence_length == 30 and q.index_shape_for((4, 4)) == (30, 1)
    assert out.indices.shape == (16, 30, 1) and out.indices.dtype == torch.long
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 32
    maps, f_hat, loss = _var_reference(q, f)
    # coarse to fine, each token map row-major: the order VAR's next-scale transformer predicts
    assert torch.equal(out.indices[..., 0], torch.cat([m.flatten(1) for m in maps], dim=1))
    assert torch.allclose(out.z_q.double(), f_hat, atol=1e-5)
    assert math.isclose(float(out.loss), float(loss), rel_tol=1e-5)
    assert torch.equal(q.indices_to_latents(out.indices), out.z_q)
    assert torch.equal(q.indices_to_latents(out.indices, channels_last=True), out.z_q.permute(0, 2, 3, 1))


def test_refiners_are_shared_across_scales_as_in_var():
    # VAR's own schedule (16x16 latents, 10 scales, 4 shared refiners); scale 2 sits at 2/9, exactly
    # halfway between the first two ticks 1/12 and 13/36, where VAR's float64 rounding picks refiner 1
    var_scales = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    q = MultiScaleResidualQuantizer(dim=4, codebook_size=8, scales=var_scales, num_refiners=4)
    assert q.refiner_of_scale == [_var_refiner(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert MultiScaleResidualQuantizer(dim=4, codebook_size=8, scales=[1, 2, 3, 4, 6, 8]).refiner_of_scale == [0, 0, 1, 2, 3, 3]
    for num_scales, num_refiners in [(2, 2), (3, 2), (4, 3), (5, 4), (7, 3), (9, 6), (10, 1)]:
        q = MultiScaleResidualQuantizer(dim=4, codebook_size=8, scales=list(range(1, num_scales + 1)),
                                        num_refiners=num_refiners)
        assert q.refiner_of_scale == [_var_refiner(k, num_scales, num_refiners) for k in range(num_scales)]
    assert MultiScaleResidualQuantizer(dim=4, codebook_size=8, scales=[1, 2], num_refiners=0).refiner_of_scale == [None, None]
    assert MultiScaleResidualQuantizer(dim=4, codebook_size=8, scales=[4], num_refiners=4).refiner_of_scale == [3]


def test_scale_maps_round_trip_and_prefixes_of_whole_scales_are_accepted():
    torch.manual_seed(1)
    q = MultiScaleResidualQuantizer(dim=8, codebook_size=32, scales=SCALES).eval()
    ids = q(_latents(4, 5)).indices
    maps = q.scale_maps(ids)
    assert [tuple(m.shape) for m in maps] == [(4, s, s) for s in SCALES]
    assert torch.equal(q.indices_from_scale_maps(maps), ids)
    assert q.prefix_lengths == [1, 5, 14, 30]
    for m, length in enumerate(q.prefix_lengths, start=1):
        prefix = q.scale_maps(ids[:, :length])
        assert len(prefix) == m and torch.equal(q.indices_from_scale_maps(prefix), ids[:, :length])
    with pytest.raises(ConfigValueError, match="maps"):
        q.indices_from_scale_maps([maps[1]])  # not the first scales
    with pytest.raises(ConfigValueError, match="maps"):
        q.indices_from_scale_maps([])


def test_bf16_autocast_gives_the_same_indices_and_gradients_pass_straight_through():
    torch.manual_seed(2)
    q = MultiScaleResidualQuantizer(dim=8, codebook_size=64, scales=SCALES).eval()
    z = _latents(16, 7) * 3
    exact = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = q(z)
    assert torch.equal(exact.indices, mixed.indices) and mixed.z_q.dtype == torch.float32
    z = z.clone().requires_grad_(True)
    q.train()(z).z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # d z_q / d z = I
    z.grad = None
    out = q(z)
    out.loss.backward()  # VAR's loss reaches the input (commitment), the codebook and the refiners
    assert z.grad.abs().sum() > 0 and q.vq.codebook.grad.abs().sum() > 0
    assert all(r.weight.grad.abs().sum() > 0 for r in q.refiners)


def test_prefixes_reconstruct_better_scale_by_scale_on_held_out_latents_after_fitting():
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(dim=8, codebook_size=32, scales=SCALES, num_refiners=2, codebook_update="loss")
    held_out = _latents(64, 1234)

    def prefix_errors() -> list[float]:
        with torch.no_grad():
            ids = q.eval()(held_out).indices
            return [float((q.indices_to_latents(ids[:, :n]) - held_out).pow(2).mean()) for n in q.prefix_lengths]

    before = prefix_errors()
    _fit(q, 30)
    errors = prefix_errors()
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * before[-1], (before, errors)  # fitting helped, at full length most
    with torch.no_grad():
        out = q(held_out)
    assert torch.equal(q.indices_to_latents(out.indices), out.z_q)
    assert errors[-1] == pytest.approx(float((out.z_q - held_out).pow(2).mean()), rel=1e-6)


def test_wrong_sizes_and_settings_are_clear_config_errors():
    q = MultiScaleResidualQuantizer(dim=8, codebook_size=16, scales=SCALES)
    with pytest.raises(ConfigValueError, match=r"^quantizer\.scales=\[1, 2, 3, 4\] .*latent size 5x5"):
        q(torch.randn(2, 8, 5, 5))  # latents 5x5, schedule ends in 4
    with pytest.raises(ConfigValueError, match=r"^quantizer\.scales=.*latent size 8x8.*data\.image_size"):
        q.index_shape_for((8, 8))
    with pytest.raises(ConfigValueError, match="z"):
        q(torch.randn(2, 16, 8))  # a 1D sequence has no scales
    for bad in (torch.zeros(1, 3, 1, dtype=torch.long), torch.zeros(1, 31, 1, dtype=torch.long),
                torch.zeros(1, 30, 2, dtype=torch.long), torch.zeros(1, 30, dtype=torch.long)):
        with pytest.raises(ConfigValueError, match="indices"):
            q.indices_to_latents(bad)  # not a prefix of whole scales
    with pytest.raises(ConfigValueError, match="indices"):
        q.indices_to_latents(torch.full((1, 5, 1), 16))  # out of range
    for kwargs, key in [({"scales": [1, 3, 2]}, "scales"), ({"scales": []}, "scales"), ({"scales": [0, 2]}, "scales"),
                        ({"l2_normalize": True}, "l2_normalize"), ({"codebook_dim": 4}, "codebook_dim"),
                        ({"upsample": "nearest"}, "upsample"), ({"refine_ratio": 1.5}, "refine_ratio")]:
        with pytest.raises(ConfigValueError, match=key):
            MultiScaleResidualQuantizer(**{"dim": 8, "codebook_size": 16, **kwargs})


def test_var_recipe_trains_end_to_end(compose_config, tmp_path):
    # TINY: 16px images, downsampling 2 -> 8x8 latents, which the recipe's scales [1, 2, 3, 4, 6, 8] end in
    _, tok, images, ids = train_recipe(compose_config, tmp_path, ["experiment=cpu_var", *TINY, *SAMPLE,
                                                                   "trainer.max_steps=6", "loss.disc_start=3"], 6)
    assert ids.shape == (images.shape[0], 130, 1) == (images.shape[0], *tok.token_shape(16))
    with torch.no_grad():
        assert tok.decode(ids[:, :14]).shape == images.shape  # the first three scales decode


def test_a_schedule_that_misses_the_latent_size_stops_the_run_before_training(compose_config, tmp_path):
    from imagetok.training.run import train

    # 32px images, downsampling 2 -> 16x16 latents; the recipe's scales end in 8
    cfg = compose_config(["experiment=cpu_var", *TINY, *SAMPLE, "data.image_size=32", "trainer.max_steps=2"])
    with pytest.raises(ConfigValueError, match=r"^quantizer\.scales=\[1, 2, 3, 4, 6, 8\] .*latent size 16x16"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
