"""SimVQ (imagetok/quantizers/simvq.py): frozen random codebook, learned linear map, every code moves;
exact nearest-code indices and inverse lookup; usable as the levels of residual VQ."""

from __future__ import annotations

import pytest
import torch

from imagetok.errors import ConfigValueError
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.quantizers.simvq import SimVectorQuantizer


def make(**kw) -> SimVectorQuantizer:
    torch.manual_seed(0)
    return SimVectorQuantizer(**({"dim": 8, "codebook_size": 64} | kw))


def test_codebook_is_frozen_and_one_step_moves_every_code_through_the_linear_map():
    vq = make().train()
    frozen, codes_before = vq.codebook.detach().clone(), vq._codes().detach().clone()
    assert not vq.codebook.requires_grad and "codebook" in vq.state_dict()
    opt = torch.optim.SGD([p for p in vq.parameters() if p.requires_grad], lr=0.1)
    assert [n for n, p in vq.named_parameters() if p.requires_grad] == ["linear.weight"]
    z = torch.randn(2, 8, 4, 4)
    out = vq(z)
    (out.z_q.pow(2).sum() + out.loss).backward()
    opt.step()
    assert torch.equal(vq.codebook, frozen)
    moved = (vq._codes().detach() - codes_before).norm(dim=1)
    used = torch.unique(out.indices).numel()
    assert used < 64 and bool((moved > 0).all())  # the unused codes moved too


@pytest.mark.parametrize("kw", [{}, {"l2_normalize": True}, {"codebook_dim": 4}, {"gradient": "rotation"}])
def test_indices_are_the_nearest_mapped_codes_and_invert_exactly(kw):
    vq = make(**kw).eval()
    z = torch.randn(3, 8, 5, 4)
    out = vq(z)
    assert out.indices.shape == (3, 5, 4, 1) and vq.codebook_sizes == [64]
    x = vq._project_in(z.movedim(1, -1).reshape(-1, 8))
    brute = torch.cdist(x, vq._codes()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), brute)
    assert torch.equal(vq.indices_to_latents(out.indices), out.z_q)
    small = make(**kw, max_search_elements=64).eval()  # the blocked search, 16 rows at a time
    assert torch.equal(small(z).indices, out.indices)


def test_options_that_do_not_apply_to_a_frozen_codebook_are_refused_in_one_line():
    for key, value in (("codebook_update", "ema"), ("kmeans_init_batches", 2), ("dead_code_threshold", 0.1)):
        with pytest.raises(ConfigValueError, match=rf"^{key}=.*SimVQ") as err:
            make(**{key: value})
        assert "\n" not in str(err.value)


def test_residual_vq_with_simvq_levels_decodes_every_prefix_and_trains_each_map():
    torch.manual_seed(0)
    rq = ResidualVectorQuantizer(dim=8, codebook_size=32, depth=3, level_quantizer="simvq").train()
    assert all(isinstance(level, SimVectorQuantizer) for level in rq.levels)
    z = torch.randn(2, 8, 4, 4)
    out = rq(z)
    (out.z_q.pow(2).sum() + out.loss).backward()
    assert all(level.linear.weight.grad.abs().sum() > 0 and level.codebook.grad is None for level in rq.levels)
    rq.eval()
    out = rq(z)
    assert out.indices.shape == (2, 4, 4, 3)
    assert torch.equal(rq.indices_to_latents(out.indices), out.z_q)
    first = rq.levels[0].indices_to_latents(out.indices[..., :1])
    assert torch.equal(rq.indices_to_latents(out.indices[..., :1]), first)
    with pytest.raises(ConfigValueError, match=r"^level_quantizer='lfq'"):
        ResidualVectorQuantizer(dim=8, codebook_size=32, level_quantizer="lfq")
