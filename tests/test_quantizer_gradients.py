"""quantizer.gradient=ste|rotation (imagetok/quantizers/_gradients.py) in every nearest-code family: the
forward value is the same for both, the rotation trick's backward equals the closed form of Fifty et al.
2024 built with explicit matrices, straight-through stays the default, bad values are one line."""

from __future__ import annotations

import pytest
import torch

from imagetok.errors import ConfigValueError
from imagetok.quantizers._gradients import rotate_onto, with_gradient
from imagetok.quantizers.dual import DualCodebookQuantizer
from imagetok.quantizers.factorized import FactorizedVectorQuantizer
from imagetok.quantizers.multiscale import MultiScaleResidualQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.quantizers.simvq import SimVectorQuantizer
from imagetok.quantizers.vq import VectorQuantizer

FAMILIES = {
    "vq": lambda **kw: VectorQuantizer(dim=8, codebook_size=32, **kw),
    "vq_l2_projected": lambda **kw: VectorQuantizer(dim=8, codebook_size=32, codebook_dim=4, l2_normalize=True, **kw),
    "rq": lambda **kw: ResidualVectorQuantizer(dim=8, codebook_size=16, depth=3, **kw),
    "rq_simvq": lambda **kw: ResidualVectorQuantizer(dim=8, codebook_size=16, depth=2, level_quantizer="simvq", **kw),
    "var": lambda **kw: MultiScaleResidualQuantizer(dim=8, codebook_size=32, scales=[1, 2, 4], **kw),
    "factorized": lambda **kw: FactorizedVectorQuantizer(dim=8, codebook_size=16, sub_dim=4, **kw),
    "dual_shared": lambda **kw: DualCodebookQuantizer(dim=8, semantic_dim=6, codebook_size=16, **kw),
    "dual_separate": lambda **kw: DualCodebookQuantizer(dim=8, semantic_dim=6, codebook_size=16, mapping="separate", **kw),
    "simvq": lambda **kw: SimVectorQuantizer(dim=8, codebook_size=32, **kw),
}


def closed_form_grad(x: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dL/dx`` per row for ``out = lambda R x`` with the paper's matrices: ``lambda R^T g``."""
    rows = []
    for xi, qi, gi in zip(x, q, g):
        e, u = xi / xi.norm(), qi / qi.norm()
        r = (e + u) / (e + u).norm()
        eye = torch.eye(xi.numel(), dtype=x.dtype)
        rot = eye - 2 * torch.outer(r, r) + 2 * torch.outer(u, e)
        rows.append(qi.norm() / xi.norm() * rot.t() @ gi)
    return torch.stack(rows)


def test_rotation_maps_each_latent_onto_its_code_and_its_gradient_is_the_closed_form():
    torch.manual_seed(0)
    x = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(20, 5, dtype=torch.float64)
    assert torch.allclose(rotate_onto(x, q), q, atol=1e-12)  # lambda R x = q
    out = with_gradient(x, q, "rotation")
    assert torch.equal(out, q)  # the value is q itself, not a rounded rotation
    g = torch.randn(20, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.allclose(grad, closed_form_grad(x.detach(), q, g), atol=1e-12)
    (ste,) = torch.autograd.grad(with_gradient(x, q, "ste"), x, g)
    assert torch.equal(ste, g) and not torch.allclose(grad, g)


def test_rotation_along_the_channel_axis_of_a_feature_map():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    q, g = torch.randn_like(x), torch.randn_like(x)
    (grad,) = torch.autograd.grad(with_gradient(x, q, "rotation", dim=1), x, g)
    flat = lambda t: t.detach().movedim(1, -1).reshape(-1, 4)  # noqa: E731
    assert torch.allclose(flat(grad), closed_form_grad(flat(x), flat(q), flat(g)), atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_rotation_keeps_the_forward_and_changes_only_the_backward(name):
    outs, grads = {}, {}
    for gradient in ("ste", "rotation"):
        torch.manual_seed(0)
        quantizer = FAMILIES[name](gradient=gradient).train()
        torch.manual_seed(1)
        z = torch.randn(2, 8, 4, 4, requires_grad=True)
        out = quantizer(z)
        out.z_q.pow(2).sum().backward()
        outs[gradient], grads[gradient] = out, z.grad
    assert torch.equal(outs["ste"].z_q, outs["rotation"].z_q)
    assert torch.equal(outs["ste"].indices, outs["rotation"].indices)
    assert torch.equal(outs["ste"].loss, outs["rotation"].loss)
    assert not torch.allclose(grads["ste"], grads["rotation"])


def test_vq_rotation_gradient_in_the_lookup_space_is_the_closed_form():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=6, codebook_size=16, gradient="rotation").train()
    z = torch.randn(2, 5, 6, requires_grad=True)  # [B, N, C] tokens: the lookup space itself
    out = vq(z)
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out.z_q, z, g)
    codes = vq.indices_to_latents(out.indices, channels_last=True)
    expected = closed_form_grad(z.detach().reshape(-1, 6).double(), codes.reshape(-1, 6).double(), g.reshape(-1, 6).double())
    assert torch.allclose(grad.reshape(-1, 6).double(), expected, atol=1e-5)


def test_rq_rotates_the_latent_onto_the_sum_of_its_codes():
    torch.manual_seed(0)
    rq = ResidualVectorQuantizer(dim=4, codebook_size=8, depth=2, gradient="rotation").eval()
    z = torch.randn(1, 4, 2, 3, requires_grad=True)
    out = rq(z)
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out.z_q, z, g)
    flat = lambda t: t.detach().movedim(1, -1).reshape(-1, 4).double()  # noqa: E731
    assert torch.allclose(flat(grad), closed_form_grad(flat(z), flat(out.z_q), flat(g)), atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_straight_through_is_the_default_and_bad_values_are_one_line(name):
    torch.manual_seed(0)
    quantizer = FAMILIES[name]()
    z = torch.randn(1, 8, 4, 4, requires_grad=True)
    quantizer.train()(z).z_q.sum().backward()
    if name in ("vq", "rq", "rq_simvq", "var", "simvq"):  # no projection in front of the lookup: identity gradient
        assert torch.equal(z.grad, torch.ones_like(z))
    with pytest.raises(ConfigValueError, match=r"^gradient='rotate' is invalid: .*'ste'.*'rotation'") as err:
        FAMILIES[name](gradient="rotate")
    assert "\n" not in str(err.value)
