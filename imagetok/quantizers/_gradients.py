"""Gradient estimators for a nearest-code lookup, shared by every lookup family (VQ, RQ, VAR multi-scale,
factorized, dual, SimVQ): ``quantizer.gradient=ste|rotation``.

The lookup ``x -> q`` (nearest code) has no useful derivative, so the quantized value is passed on
with a substitute gradient to ``x``:

* ``ste``: straight-through (van den Oord et al. 2017), ``dq/dx = I``.
* ``rotation``: the rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the
  Rotation Trick", https://arxiv.org/abs/2410.06424). ``q`` is written as ``lambda R x`` with the
  rotation ``R`` that turns ``e = x/|x|`` onto ``u = q/|q|`` and the rescaling ``lambda = |q|/|x|``,
  both treated as constants: ``dq/dx = lambda R`` with, for ``r = (e + u)/|e + u|``,
  ``R = I - 2 r r^T + 2 u e^T``. The gradient then carries the angle and length of ``x`` relative to
  its code, so points of one Voronoi cell get different gradients.

Either way the forward value is exactly ``q`` (``x - sg(x)`` and ``R x - sg(R x)`` are exactly zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagetok.errors import check

GRADIENTS = ("ste", "rotation")
_EPS = 1e-12  # only guards 0/0: a zero latent or a code exactly opposite its latent


def check_gradient(gradient: str) -> None:
    """One-line :class:`ConfigValueError` (key ``gradient``, prefixed ``quantizer.`` by the builder) for
    an unknown estimator."""
    check(gradient in GRADIENTS, "gradient", gradient,
          "'ste' (straight-through) or 'rotation' (rotation trick, Fifty et al. 2024)")


def rotate_onto(x: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``lambda R x`` computed from vectors only (no ``D x D`` matrix), with ``lambda`` and ``R``
    detached (see the module docstring). ``x``, ``q``: same shape, vectors along ``dim``. Equals ``q``
    up to rounding; its gradient with respect to ``x`` is ``lambda R`` (transposed in the backward)."""
    x_norm = x.detach().norm(dim=dim, keepdim=True)
    q_norm = q.detach().norm(dim=dim, keepdim=True)
    e = x.detach() / x_norm.clamp_min(_EPS)
    u = q.detach() / q_norm.clamp_min(_EPS)
    r = F.normalize(e + u, dim=dim, eps=_EPS)
    scale = q_norm / x_norm.clamp_min(_EPS)
    # R x = x - 2 r (r.x) + 2 u (e.x): two dot products per vector
    rx = x - 2 * r * (r * x).sum(dim, keepdim=True) + 2 * u * (e * x).sum(dim, keepdim=True)
    return scale * rx


def with_gradient(x: torch.Tensor, q: torch.Tensor, gradient: str = "ste", dim: int = -1) -> torch.Tensor:
    """Value exactly ``q`` (detached), gradient to ``x`` by ``gradient`` (``"ste"`` or ``"rotation"``).

    ``x``: latents, ``q``: their codes, same shape (any), vectors along ``dim`` (the channel axis).
    The code itself receives no gradient here: codebooks learn through their own losses or EMA."""
    q = q.detach()
    if gradient == "ste":
        return q + (x - x.detach())
    if gradient == "rotation":
        rotated = rotate_onto(x, q, dim)
        return q + (rotated - rotated.detach())
    check_gradient(gradient)
    raise AssertionError("unreachable")
