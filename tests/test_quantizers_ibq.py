"""IBQ (imagetok/quantizers/ibq.py): every code gets a gradient, the blocked backward equals autograd
through the whole softmax, indices are the largest logits and invert exactly."""

from __future__ import annotations

import pytest
import torch

from imagetok.errors import ConfigValueError
from imagetok.quantizers.ibq import (IndexBackpropQuantizer, _CodeEntropy, _IndexBackprop, code_entropy_reference, ibq_logits,
                                    index_backprop_reference)


def make(**kw) -> IndexBackpropQuantizer:
    torch.manual_seed(0)
    return IndexBackpropQuantizer(**({"dim": 8, "codebook_size": 64} | kw))


@pytest.mark.parametrize("kw", [{}, {"l2_normalize": True, "temperature": 0.1}, {"similarity": "distance"},
                                {"codebook_dim": 4, "double_quant": False}])
def test_every_code_gets_a_gradient_and_so_does_the_encoder(kw):
    ibq = make(**kw).train()
    encoder = torch.nn.Conv2d(3, 8, 1)
    out = ibq(encoder(torch.randn(2, 3, 4, 4)))
    (out.z_q.pow(2).sum() + out.loss).backward()
    assert torch.unique(out.indices).numel() < 64  # most codes were not chosen ...
    assert bool((ibq.codebook.grad.abs().sum(1) > 0).all())  # ... and every one has a gradient
    assert encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("similarity", ["dot", "distance"])
def test_blocked_backward_equals_autograd_through_the_whole_softmax(similarity):
    torch.manual_seed(0)
    x = torch.randn(37, 5, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(50, 5, dtype=torch.float64, requires_grad=True)
    idx = ibq_logits(x, codes, similarity, 0.5).argmax(1)
    g = torch.randn(37, 5, dtype=torch.float64)
    reference = index_backprop_reference(x, codes, idx, similarity, 0.5)
    expected = torch.autograd.grad(reference, (x, codes), g)
    for rows in (1, 16, 37):  # uneven blocks, several blocks, one block
        blocked = _IndexBackprop.apply(x, codes, idx, similarity, 0.5, rows)
        assert torch.equal(blocked, codes[idx]) and torch.allclose(blocked, reference, atol=0)
        for got, want in zip(torch.autograd.grad(blocked, (x, codes), g), expected):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"similarity": "distance"}, {"l2_normalize": True}])
def test_indices_are_the_largest_logits_and_invert_exactly(kw):
    ibq = make(**kw).eval()
    z = torch.randn(3, 8, 5, 4)
    out = ibq(z)
    assert out.indices.shape == (3, 5, 4, 1) and ibq.codebook_sizes == [64]
    x = ibq._project_in(z.movedim(1, -1).reshape(-1, 8))
    assert torch.equal(out.indices.reshape(-1), ibq_logits(x, ibq._codes(), ibq.similarity, 1.0).argmax(1))
    assert torch.equal(ibq.indices_to_latents(out.indices), out.z_q)
    ibq.train()
    trained = ibq(z)  # the training forward's value is the same code, the gradient path aside
    assert torch.equal(trained.z_q, out.z_q) and torch.equal(trained.indices, out.indices)


def test_bad_values_are_one_line():
    for kw, key in (({"temperature": 0.0}, "temperature"), ({"similarity": "cos"}, "similarity"),
                    ({"codebook_update": "ema"}, "codebook_update"), ({"gradient": "rotation"}, "gradient"),
                    ({"entropy_temperature": -1.0}, "entropy_temperature")):
        with pytest.raises(ConfigValueError, match=rf"^{key}=") as err:
            make(**kw)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("similarity", ["dot", "distance"])
def test_blocked_entropy_penalty_equals_autograd_and_reaches_every_code(similarity):
    torch.manual_seed(0)
    x = torch.randn(37, 5, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(50, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 0.3, -0.7], dtype=torch.float64)  # all three outputs used downstream
    reference = code_entropy_reference(x, codes, similarity, 0.5, 0.8)
    expected = torch.autograd.grad((reference * weights).sum(), (x, codes))
    for rows in (1, 16, 37):
        blocked = _CodeEntropy.apply(x, codes, similarity, 0.5, rows, 0.8)
        assert torch.allclose(blocked, reference, rtol=1e-12)
        for got, want in zip(torch.autograd.grad((blocked * weights).sum(), (x, codes)), expected):
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    ibq = make(entropy_weight=0.1, entropy_temperature=0.01).train()
    out = ibq(torch.randn(2, 8, 4, 4))
    assert {"entropy/per_token", "entropy/codebook"} <= set(out.metrics)
    out.loss.backward()
    assert bool((ibq.codebook.grad.abs().sum(1) > 0).all())


def test_straight_through_option_adds_the_identity_gradient_and_keeps_the_value():
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    grads, values = [], []
    for straight_through in (False, True):
        ibq = make(straight_through=straight_through).train()
        out = ibq(z)
        (g,) = torch.autograd.grad(out.z_q.sum(), z)
        grads.append(g)
        values.append(out.z_q)
    assert torch.equal(values[0], values[1])
    assert torch.allclose(grads[1], grads[0] + 1, atol=1e-6)
