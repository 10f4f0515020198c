"""Binary lookup-free quantizers (LFQ, BSQ): the code each latent gets, exact inverse lookup, index
ranges, fp32/bf16 index equality, straight-through gradients, entropy terms against a brute force over
all 2^d codes of the papers' soft assignment, the grouped codebook entropy as an upper bound, sub-token
packing, a 2^128 codebook as 8 sub-tokens of 16 bits, clear config errors, and recipes that train."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import train_recipe
from imagetok.errors import ConfigValueError
from imagetok.quantizers._binary import bits_to_subtokens, count_statistics, subtokens_to_bits
from imagetok.quantizers.bsq import BinarySphericalQuantizer
from imagetok.quantizers.lfq import LookupFreeQuantizer
from test_train_variants import SAMPLE, TINY

FAMILIES = [LookupFreeQuantizer, BinarySphericalQuantizer]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _all_codes(d: int) -> torch.Tensor:
    """Every sign pattern of ``d`` bits as float64 ``[2^d, d]`` in {-1, +1}."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def _brute_force_probs(quantizer, tokens: torch.Tensor) -> torch.Tensor:
    """The papers' soft assignment of tokens ``[T, d]`` to all ``2^d`` codes ``[T, 2^d]`` (float64),
    written from the definitions, not from the module's per-bit factorisation."""
    x, d, t = tokens.double(), tokens.shape[1], quantizer.inv_temperature
    if isinstance(quantizer, LookupFreeQuantizer):  # softmax(-||x - c||^2 / tau), c in {-s, s}^d
        codes = _all_codes(d) * quantizer.codebook_scale
        return torch.softmax(-torch.cdist(x, codes).pow(2) * t, dim=-1)
    u = F.normalize(x, dim=-1)  # BSQ: softmax(2 c.u / tau), c in {-1/sqrt(d), 1/sqrt(d)}^d
    codes = _all_codes(d) / math.sqrt(d)
    return torch.softmax(2 * u @ codes.t() * t, dim=-1)


@pytest.mark.parametrize("cls", FAMILIES)
def test_codes_are_signs_and_indices_invert_exactly(cls):
    torch.manual_seed(0)
    q = cls(dim=8, bits=8).eval()
    assert q.codebook_sizes == [256]
    z = torch.randn(4, 8, 5, 3)
    out = q(z)
    assert out.indices.shape == (4, 5, 3, 1) and out.indices.dtype == torch.long
    # the index is the number whose bit i is [z_i > 0], least significant bit first
    expected = ((z > 0).long() * 2 ** torch.arange(8)[:, None, None]).sum(1)
    assert torch.equal(out.indices[..., 0], expected)
    magnitude = 1.0 if cls is LookupFreeQuantizer else 1 / math.sqrt(8)
    assert torch.equal(out.z_q, torch.where(z > 0, magnitude, -magnitude))
    assert torch.equal(q.indices_to_latents(out.indices), out.z_q)
    assert torch.equal(q.indices_to_latents(out.indices, channels_last=True), out.z_q.movedim(1, -1))
    # a [B, N, C] sequence is channels last and keeps its layout
    seq = q(z.flatten(2).transpose(1, 2))
    assert seq.indices.shape == (4, 15, 1) and torch.equal(seq.indices.reshape(4, 5, 3, 1), out.indices)
    with pytest.raises(ConfigValueError, match="indices"):
        q.indices_to_latents(torch.full((1, 2, 2, 1), 256))
    with pytest.raises(ConfigValueError, match="indices"):
        q.indices_to_latents(torch.zeros(1, 2, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("cls", FAMILIES)
def test_projected_grouped_indices_match_under_bf16_autocast_and_stay_in_range(cls):
    torch.manual_seed(0)
    q = cls(dim=16, bits=12, bits_per_token=4).eval()  # dim != bits: linear projections in and out
    assert q.codebook_sizes == [16, 16, 16]
    z = torch.randn(8, 16, 6, 6) * 3
    exact = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = q(z)
    assert torch.equal(exact.indices, mixed.indices) and mixed.z_q.dtype == torch.float32
    assert exact.indices.shape == (8, 6, 6, 3)
    assert int(exact.indices.min()) >= 0 and int(exact.indices.max()) < 16
    assert len(exact.indices.unique()) == 16  # every value of a 4-bit sub-token occurs
    assert torch.equal(q.indices_to_latents(exact.indices), exact.z_q)
    with torch.no_grad():  # an eval forward without gradients returns only the commitment term
        plain = q(z)
    assert torch.equal(plain.loss, q.commitment_weight * plain.metrics["commitment"])
    assert "per_sample_entropy" not in plain.metrics


def test_lfq_straight_through_gradient_is_the_identity_and_reaches_projected_inputs():
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    LookupFreeQuantizer(dim=8, bits=8).train()(z).z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # d z_q / d z = I: straight through the sign
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    out = LookupFreeQuantizer(dim=16, bits=8).train()(z)
    (out.z_q.sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()


def test_bsq_straight_through_gradient_is_that_of_the_sphere_projection():
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    w = torch.randn(2, 8, 4, 4)
    (BinarySphericalQuantizer(dim=8, bits=8, entropy_weight=0.0).train()(z).z_q * w).sum().backward()
    reference = z.detach().clone().requires_grad_(True)
    (F.normalize(reference, dim=1) * w).sum().backward()  # z_q's gradient is u = z / ||z||'s
    assert torch.allclose(z.grad, reference.grad, atol=1e-6)


@pytest.mark.parametrize("cls", FAMILIES)
def test_entropy_terms_equal_a_brute_force_over_all_codes(cls):
    torch.manual_seed(1)
    d = 8
    # temperatures that make the soft assignment neither uniform nor one-hot
    q = cls(dim=d, bits=d, entropy_group_bits=d, inv_temperature=1.0 if cls is LookupFreeQuantizer else 4.0,
            entropy_weight=0.3, codebook_entropy_weight=0.7, commitment_weight=0.2).train()
    z = torch.randn(3, d, 4, 4) * 0.5
    out = q(z)
    probs = _brute_force_probs(q, z.permute(0, 2, 3, 1).reshape(-1, d))  # [48, 256]
    per_sample, codebook = _entropy(probs).mean(), _entropy(probs.mean(0))
    assert 0.3 < float(per_sample) < d * math.log(2) - 0.3  # non-trivial: neither one-hot nor uniform
    assert math.isclose(float(out.metrics["per_sample_entropy"]), float(per_sample), rel_tol=1e-5)
    assert math.isclose(float(out.metrics["codebook_entropy"]), float(codebook), rel_tol=1e-5)
    expected = 0.2 * out.metrics["commitment"] + 0.3 * (per_sample - 0.7 * codebook)
    assert math.isclose(float(out.loss), float(expected), rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("cls", FAMILIES)
def test_grouped_codebook_entropy_sums_group_marginals_and_bounds_the_joint_entropy(cls):
    torch.manual_seed(2)
    d = 8
    # correlated bits (a low-rank latent), so the joint entropy is strictly below the grouped sum
    z = (torch.randn(64, 2) @ torch.randn(2, d)).reshape(4, 4, 4, d).permute(0, 3, 1, 2) * 0.3
    tokens = z.permute(0, 2, 3, 1).reshape(-1, d)
    estimates = []
    for g in (1, 2, 4, 8):
        q = cls(dim=d, bits=d, entropy_group_bits=g, inv_temperature=5.0 if cls is LookupFreeQuantizer else 20.0).train()
        out = q(z)
        mean_probs = _brute_force_probs(q, tokens).mean(0).reshape([2] * d)  # axis j <-> latent channel j
        joint = float(_entropy(mean_probs.reshape(-1)))
        # independent computation of the estimate: marginal of each group of bits, entropies summed
        marginals = []
        for k in range(d // g):
            others = [a for a in range(d) if not k * g <= a < (k + 1) * g]
            marginals.append((mean_probs.sum(dim=others) if others else mean_probs).reshape(-1))
        grouped = float(sum(_entropy(m) for m in marginals))
        assert math.isclose(float(out.metrics["codebook_entropy"]), grouped, rel_tol=1e-5)
        estimates.append(grouped)
        if g < d:
            assert grouped > joint + 0.3  # an upper bound, strictly above for correlated bits
        else:
            assert math.isclose(grouped, joint, rel_tol=1e-9)  # one group: the joint entropy itself
        # per-sample entropy is exact whatever the grouping
        assert math.isclose(float(out.metrics["per_sample_entropy"]), float(_entropy(_brute_force_probs(q, tokens)).mean()),
                            rel_tol=1e-5)
    assert all(a > b for a, b in zip(estimates, estimates[1:])), estimates  # larger groups: tighter bound


def test_sub_token_packing_round_trips_little_endian():
    bits = torch.rand(5, 7, 128, generator=torch.Generator().manual_seed(3)) > 0.5
    ids = bits_to_subtokens(bits, 16)
    assert ids.shape == (5, 7, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 2**16
    assert torch.equal(subtokens_to_bits(ids, 16), bits)
    assert bits_to_subtokens(torch.tensor([True, False, True, True, False, False]), 3).tolist() == [5, 1]
    assert subtokens_to_bits(torch.tensor([6]), 3).tolist() == [False, True, True]
    wide = torch.tensor([2**62 - 1, 0, 12345678901234])
    assert torch.equal(bits_to_subtokens(subtokens_to_bits(wide, 62), 62), wide)  # 62-bit sub-tokens fit int64


def test_usage_statistics_are_the_same_from_a_dense_histogram_or_sorted_tokens():
    ids = torch.tensor([0, 0, 1, 3, 3, 3, 2, 0])
    dense, sparse = count_statistics(ids, 8), count_statistics(ids, 2**40)  # bincount / torch.unique
    counts = torch.tensor([3.0, 1.0, 1.0, 3.0]) / 8
    entropy_bits = float(-(counts * counts.log2()).sum())
    for stats, size in ((dense, 8), (sparse, 2**40)):
        assert math.isclose(float(stats["entropy_bits"]), entropy_bits, rel_tol=1e-6)
        assert math.isclose(float(stats["perplexity"]), 2**entropy_bits, rel_tol=1e-6)
        assert math.isclose(float(stats["batch_usage"]), 4 / size, rel_tol=1e-6)


@pytest.mark.parametrize("cls", FAMILIES)
def test_a_2_to_the_128_codebook_trains_as_8_sub_tokens_of_16_bits(cls):
    torch.manual_seed(4)
    q = cls(dim=128, bits=128, bits_per_token=16, entropy_group_bits=8).train()
    assert q.codebook_sizes == [2**16] * 8
    # nothing is sized by the codebook: the entropy estimate enumerates 2^8 sub-codes per group only
    assert all(b.numel() <= 2**8 * 8 for b in q.buffers())
    z = torch.randn(2, 128, 4, 4, requires_grad=True)
    out = q(z)
    (out.z_q.pow(2).sum() + out.loss).backward()
    assert torch.isfinite(out.loss) and z.grad.abs().sum() > 0
    assert out.indices.shape == (2, 4, 4, 8)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 2**16
    assert out.metrics["codebook_entropy"] <= 16 * 8 * math.log(2) + 1e-4
    q.eval()
    with torch.no_grad():
        ev = q(z)
    assert torch.equal(q.indices_to_latents(ev.indices), ev.z_q)
    assert torch.equal(subtokens_to_bits(ev.indices, 16), z.detach().permute(0, 2, 3, 1) > 0)


@pytest.mark.parametrize("cls", FAMILIES)
def test_bad_sub_token_and_group_sizes_are_clear_config_errors(cls):
    for kwargs, key in [({"bits_per_token": 5}, "bits_per_token"), ({"bits_per_token": 0}, "bits_per_token"),
                        ({"bits": 128, "bits_per_token": 64}, "bits_per_token"),
                        ({"bits": 64, "bits_per_token": None}, r"bits_per_token=None .*only up to 62 bits"),
                        ({"entropy_group_bits": 3}, "entropy_group_bits"),
                        ({"bits": 64, "bits_per_token": 16, "entropy_group_bits": 32}, "entropy_group_bits"),
                        ({"inv_temperature": 0.0}, "inv_temperature")]:
        with pytest.raises(ConfigValueError, match=key):
            cls(**{"dim": 8, "bits": 8, **kwargs})
    # defaults: one sub-token of all bits; the largest group that divides the bits, at most 12
    assert cls(dim=18).entropy_group_bits == 9 and cls(dim=18).codebook_sizes == [2**18]
    assert cls(dim=128, bits_per_token=16).entropy_group_bits == 8


@pytest.mark.parametrize("recipe,k", [("cpu_lfq", 2), ("cpu_bsq", 2), ("cpu_bsq128", 8)])
def test_recipes_train_end_to_end(compose_config, tmp_path, recipe, k):
    _, tok, images, ids = train_recipe(compose_config, tmp_path, [f"experiment={recipe}", *TINY, *SAMPLE,
                                                                   "trainer.max_steps=6", "loss.disc_start=3"], 6)
    assert ids.shape == (images.shape[0], 8, 8, k) and len(tok.codebook_sizes) == k
