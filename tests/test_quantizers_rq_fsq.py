"""Residual VQ and FSQ: exact inverse lookup, index ranges, fp32/bf16 index equality, prefix decoding
that improves with depth on held-out latents, rank-agreeing quantizer dropout, and recipes that train."""

from __future__ import annotations


import pytest
import torch

from conftest import train_recipe
from imagetok.errors import ConfigValueError
from imagetok.quantizers.fsq import FiniteScalarQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from test_train_variants import SAMPLE, TINY


def _latents(n: int, seed: int) -> torch.Tensor:
    """Clustered latents [n, 8, 4, 4]: a mixture of 6 Gaussians, as an encoder's output tends to be."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 8, generator=torch.Generator().manual_seed(99)) * 2
    pick = torch.randint(0, 6, (n, 4, 4), generator=g)
    return (centres[pick] + 0.5 * torch.randn(n, 4, 4, 8, generator=g)).permute(0, 3, 1, 2)


def _fitted_rq(**kwargs) -> ResidualVectorQuantizer:
    torch.manual_seed(0)
    rq = ResidualVectorQuantizer(dim=8, codebook_size=16, depth=4, codebook_update="ema", kmeans_init_batches=1, **kwargs)
    rq.train()
    for step in range(20):
        rq(_latents(32, step))
    return rq.eval()


def test_residual_prefixes_decode_and_improve_monotonically_on_held_out_latents():
    rq = _fitted_rq()
    held_out = _latents(64, 1234)
    with torch.no_grad():
        out = rq(held_out)
    assert out.indices.shape == (64, 4, 4, 4) and rq.codebook_sizes == [16] * 4
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 16
    assert torch.equal(rq.indices_to_latents(out.indices), out.z_q)
    errors = [float((rq.indices_to_latents(out.indices[..., :d]) - held_out).pow(2).mean()) for d in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert len(rq.levels) == 4
    with pytest.raises(ConfigValueError, match="indices"):
        rq.indices_to_latents(torch.zeros(1, 2, 2, 5, dtype=torch.long))


def test_shared_codebook_is_one_codebook_for_every_level():
    rq = _fitted_rq(shared_codebook=True)
    assert len(rq.levels) == 1 and sum(k.endswith("codebook") for k in rq.state_dict()) == 1
    out = rq(_latents(8, 5))
    assert out.indices.shape[-1] == 4 and torch.equal(rq.indices_to_latents(out.indices), out.z_q)


def test_residual_quantizer_dropout_trains_prefixes_and_leaves_dropped_levels_alone():
    torch.manual_seed(0)
    rq = ResidualVectorQuantizer(dim=8, codebook_size=16, depth=4, quantizer_dropout=1.0, codebook_update="ema")
    rq.train()
    used = set()
    for step in range(12):
        before = [lvl.codebook.detach().clone() for lvl in rq.levels]
        out = rq(_latents(8, step))
        n = int(out.metrics["levels_used"])
        used.add(n)
        assert out.indices.shape[-1] == 4  # indices of every level, always
        for i, lvl in enumerate(rq.levels):  # EMA codebooks move only for the levels that were used
            assert torch.equal(lvl.codebook, before[i]) == (i >= n)
    assert len(used) > 1 and used <= {1, 2, 3, 4}
    with pytest.raises(ConfigValueError, match="l2_normalize"):
        ResidualVectorQuantizer(dim=8, codebook_size=16, l2_normalize=True)


def test_fsq_indices_cover_the_grid_exactly_and_invert():
    fsq = FiniteScalarQuantizer(dim=4, levels=[8, 5, 5, 3]).eval()
    assert fsq.codebook_sizes == [600]
    z = torch.randn(64, 4, 6, 6) * 4
    out = fsq(z)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 600
    assert torch.equal(fsq.indices_to_latents(out.indices), out.z_q)
    assert out.z_q.abs().max() <= 1
    # the 600 codes are 600 distinct grid points, and a sweep of inputs reaches every value per channel
    latents = fsq.indices_to_latents(torch.arange(600).reshape(1, 600, 1), channels_last=True)
    assert latents.unique(dim=1).shape[1] == 600
    sweep = torch.linspace(-8, 8, 4001).reshape(1, -1, 1).expand(1, -1, 4).contiguous()
    ids = fsq(sweep).indices.reshape(-1)
    digits = [(ids // b) % n for b, n in zip([1, 8, 40, 200], [8, 5, 5, 3])]
    assert [int(d.unique().numel()) for d in digits] == [8, 5, 5, 3]
    # straight-through: gradients reach the input
    z.requires_grad_(True)
    fsq.train()(z).z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ConfigValueError, match="levels"):
        FiniteScalarQuantizer(dim=4, levels=[8, 1])


def test_fsq_projection_and_bf16_give_the_same_indices():
    torch.manual_seed(0)
    for quantizer in (FiniteScalarQuantizer(dim=8, levels=[8, 8, 8, 5, 5, 5]), _fitted_rq()):
        quantizer.eval()
        z = _latents(16, 7)
        exact = quantizer(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = quantizer(z)
        assert torch.equal(exact.indices, mixed.indices) and mixed.z_q.dtype == torch.float32
        assert torch.equal(quantizer.indices_to_latents(exact.indices), exact.z_q)


@pytest.mark.parametrize("recipe,k", [("cpu_rq", 4), ("cpu_fsq", 1)])
def test_recipes_train_end_to_end(compose_config, tmp_path, recipe, k):
    _, tok, images, ids = train_recipe(compose_config, tmp_path, [f"experiment={recipe}", *TINY, *SAMPLE,
                                                                   "trainer.max_steps=6", "loss.disc_start=3"], 6)
    assert ids.shape[-1] == k == len(tok.codebook_sizes)
    with torch.no_grad():
        if k > 1:
            assert tok.decode(ids[..., :1]).shape == images.shape  # a prefix decodes
