"""VectorQuantizer: straight-through gradients, exact inverse lookup, EMA, k-means, restarts, chunked
search and float32 math under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imagetok.errors import ConfigValueError
from imagetok.quantizers._utils import nearest_code
from imagetok.quantizers.vq import VectorQuantizer


def make(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(**({"dim": 8, "codebook_size": 32} | kw))


VARIANTS = [
    {},
    {"l2_normalize": True},
    {"codebook_dim": 4},
    {"codebook_dim": 4, "l2_normalize": True, "codebook_update": "ema"},
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_straight_through_gradient_reaches_encoder(kw):
    vq = make(**kw).train()
    encoder = torch.nn.Conv2d(3, 8, 1)
    z = encoder(torch.randn(2, 3, 4, 4))
    out = vq(z)
    (out.z_q.pow(2).sum() + out.loss).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    if kw.get("codebook_update", "loss") == "loss":
        assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_straight_through_is_identity_gradient():
    vq = make().train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    vq(z).z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_indices_to_latents_equals_forward_z_q(kw, training):
    vq = make(**kw).train(training)
    z = torch.randn(3, 8, 5, 4)
    out = vq(z)
    assert out.indices.shape == (3, 5, 4, 1) and out.indices.dtype == torch.long
    if training and kw.get("codebook_update") == "ema":
        vq.eval()  # the EMA step moved the codes after the lookup; compare with a fresh eval pass
        out = vq(z)
    assert torch.equal(vq.indices_to_latents(out.indices), out.z_q)


def test_sequence_layout_round_trip():
    vq = make(codebook_dim=4).eval()
    z = torch.randn(2, 7, 8)  # [B, N, C]
    out = vq(z)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 7, 1)
    assert torch.equal(vq.indices_to_latents(out.indices, channels_last=True), out.z_q)


def test_indices_in_range_and_out_of_range_refused():
    vq = make().eval()
    idx = vq(torch.randn(4, 8, 6, 6)).indices
    assert int(idx.min()) >= 0 and int(idx.max()) < 32
    with pytest.raises(ConfigValueError, match="indices"):
        vq.indices_to_latents(torch.full((1, 2, 2, 1), 32))


def test_nearest_code_is_the_true_nearest():
    torch.manual_seed(1)
    tokens, codes = torch.randn(100, 5), torch.randn(40, 5)
    expected = torch.cdist(tokens, codes).argmin(1)
    assert torch.equal(nearest_code(tokens, codes), expected)


@pytest.mark.parametrize("cosine", [False, True])
def test_chunked_search_equals_unchunked(cosine):
    torch.manual_seed(2)
    tokens, codes = torch.randn(1000, 8), torch.randn(4096, 8)
    if cosine:
        tokens, codes = F.normalize(tokens, dim=-1), F.normalize(codes, dim=-1)
    full = nearest_code(tokens, codes, max_elements=10**9, cosine=cosine)
    for rows in (1, 7, 100):
        chunked = nearest_code(tokens, codes, max_elements=4096 * rows, cosine=cosine, min_rows=1)
        assert torch.equal(chunked, full)


def test_chunked_quantizer_forward_equals_unchunked():
    a = make(codebook_size=512, max_search_elements=1).eval()  # min_rows (16) rows per block
    b = make(codebook_size=512).eval()
    z = torch.randn(2, 8, 8, 8)
    assert torch.equal(a(z).indices, b(z).indices)


@pytest.mark.parametrize("kw", VARIANTS)
def test_bf16_autocast_gives_fp32_indices(kw):
    vq = make(**kw).eval()
    z = torch.randn(4, 8, 8, 8)
    reference = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = vq(z)
    assert torch.equal(under_bf16.indices, reference.indices)
    assert under_bf16.z_q.dtype == torch.float32


def test_ema_update_moves_codes_toward_assigned_means():
    vq = make(dim=2, codebook_size=2, codebook_update="ema", decay=0.5, epsilon=0.0).train()
    vq.codebook.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    # tokens near code 0 (mean [1, 1]) and near code 1 (mean [9, 9])
    tokens = torch.tensor([[0.5, 1.5], [1.5, 0.5], [9.0, 8.0], [9.0, 10.0]])
    z = tokens.T.reshape(1, 2, 2, 2)  # [B, C, H, W] whose flattened tokens are `tokens`
    vq(z)  # first training step: initialises statistics to the current codes, then updates them
    code = vq.codebook.data
    init_size = 4 / 2
    size = 0.5 * init_size + 0.5 * 2
    expected0 = (0.5 * torch.tensor([0.0, 0.0]) * init_size + 0.5 * torch.tensor([2.0, 2.0])) / size
    expected1 = (0.5 * torch.tensor([10.0, 10.0]) * init_size + 0.5 * torch.tensor([18.0, 18.0])) / size
    assert torch.allclose(code[0], expected0) and torch.allclose(code[1], expected1)
    before = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    means = torch.tensor([[1.0, 1.0], [9.0, 9.0]])
    assert ((code - means).norm(dim=1) < (before - means).norm(dim=1)).all()


def test_laplace_smoothing_keeps_an_unused_code_finite_and_preserves_the_total_count():
    vq = make(dim=2, codebook_size=2, codebook_update="ema", decay=0.5, epsilon=0.1).train()
    vq.codebook.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).T.reshape(1, 2, 2, 1)  # both tokens go to code 0
    vq(z)  # initialises statistics (1 expected count per code), then one update
    vq.cluster_size[1], vq.embed_sum[1] = 0.0, 0.0  # code 1 has never been used
    vq(z)
    assert torch.isfinite(vq.codebook.data).all()
    assert torch.equal(vq.codebook.data[1], torch.zeros(2))  # 0 / smoothed count, not 0 / 0
    # code 0: its averaged sum over its smoothed count, where smoothing moves epsilon of mass per code
    # but keeps the total n: (c0 + eps) / (n + 2 eps) * n
    c0, n = vq.cluster_size[0], vq.cluster_size.sum()
    assert torch.allclose(vq.codebook.data[0], vq.embed_sum[0] / ((c0 + 0.1) / (n + 0.2) * n))


def _blobs(n_per: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    centers = torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, -5.0, 0, 0]])
    points = (centers[:, None] + 0.1 * torch.randn(4, n_per, 4)).reshape(-1, 4)
    return centers, points[torch.randperm(points.shape[0])]


def test_kmeans_init_from_first_batches_changes_only_the_codebook_statistics():
    centers, points = _blobs()
    vq = make(dim=4, codebook_size=16, kmeans_init_batches=2, kmeans_iters=20).train()
    snapshot = {k: v.clone() for k, v in vq.state_dict().items()}
    first, second = points[:128], points[128:]
    vq(first.T.reshape(1, 4, 128, 1))
    after_first = vq.state_dict()
    assert all(torch.equal(after_first[k], v) for k, v in snapshot.items()), "nothing changes while pooling"
    vq(second.T.reshape(1, 4, 128, 1))
    codes = vq.codebook.data
    # Lloyd's fixed point over the pooled batches: each used code is the mean of its points
    assign = torch.cdist(points, codes).argmin(1)
    for k in assign.unique():
        assert torch.allclose(codes[k], points[assign == k].mean(0), atol=1e-5)
    assert torch.cdist(centers, codes).min(dim=1).values.max() < 0.3  # every blob (7 apart) got a code
    assert bool(vq.initialized)
    assert torch.allclose(vq.cluster_size.sum(), torch.tensor(128.0))  # per-step counts of one batch


def test_kmeans_init_with_projection_leaves_the_projections_alone():
    vq = make(dim=8, codebook_dim=4, l2_normalize=True, codebook_update="ema", kmeans_init_batches=1).train()
    snapshot = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(2, 8, 8, 8)
    vq(z)
    changed = {k for k, v in vq.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert {"codebook", "initialized", "cluster_size", "embed_sum"} <= changed
    assert changed <= {"codebook", "initialized", "cluster_size", "embed_sum", "last_used", "step"}
    assert {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"} <= set(snapshot)
    # the codes live where the search happens: on the unit sphere of the projected space
    assert torch.allclose(vq.codebook.data.norm(dim=1), torch.ones(32), atol=1e-5)


def test_encode_without_gradients_never_changes_the_quantizer():
    vq = make(codebook_update="ema", kmeans_init_batches=1, dead_code_threshold=1.0).train()
    snapshot = {k: v.clone() for k, v in vq.state_dict().items()}
    with torch.no_grad():  # what Tokenizer.encode does, whatever the mode
        vq(torch.randn(2, 8, 4, 4))
    assert all(torch.equal(vq.state_dict()[k], v) for k, v in snapshot.items())
    vq(torch.randn(2, 8, 4, 4))  # a training forward does update
    assert bool(vq.initialized)


def test_dead_code_restart_replaces_only_dead_codes_with_batch_latents():
    vq = make(dim=4, codebook_size=16, dead_code_threshold=0.5).train()
    z = torch.randn(2, 4, 4, 4)
    vq(z)  # initialise statistics
    vq.cluster_size[:] = 10.0
    dead = torch.tensor([1, 5, 7])
    vq.cluster_size[dead] = 0.0
    before = vq.codebook.data.clone()
    z2 = torch.randn(2, 4, 4, 4)
    metrics = vq(z2).metrics
    after = vq.codebook.data
    alive = torch.ones(16, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(after[alive], before[alive])
    tokens = z2.permute(0, 2, 3, 1).reshape(-1, 4)
    for i in dead:  # each revived code is one of this batch's latents
        assert (tokens - after[i]).abs().sum(1).min() < 1e-6
    assert torch.allclose(vq.cluster_size[dead], torch.full((3,), 0.5))
    assert metrics["restarted_codes"] == 3


def test_dead_code_restart_with_ema_projection_and_l2_resets_the_statistics():
    vq = make(dim=8, codebook_size=16, codebook_dim=4, l2_normalize=True, codebook_update="ema",
              dead_code_threshold=0.5).train()
    vq(torch.randn(2, 8, 4, 4))  # initialise statistics
    vq.cluster_size[:] = 10.0
    dead = torch.tensor([2, 9])
    vq.cluster_size[dead] = 0.0
    z2 = torch.randn(2, 8, 4, 4)
    assert vq(z2).metrics["restarted_codes"] == 2
    # revived codes are this batch's latents where the search happens: projected, on the unit sphere
    with torch.no_grad():
        latents = F.normalize(vq.project_in(z2.permute(0, 2, 3, 1).reshape(-1, 8)), dim=-1)
    for i in dead:
        assert (latents - vq.codebook.data[i]).abs().sum(1).min() < 1e-5
        assert torch.allclose(vq.embed_sum[i], vq.codebook.data[i] * 0.5)  # stale sums are gone
    assert torch.allclose(vq.cluster_size[dead], torch.full((2,), 0.5))


def test_usage_over_window_and_perplexity():
    vq = make(dim=2, codebook_size=4, usage_window=2).train()
    vq.codebook.data = torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    near = lambda i: vq.codebook.data[i].reshape(1, 2, 1, 1).clone()  # one token at code i
    vq(near(0)), vq(near(1))
    assert vq.window_usage() == 0.5  # codes 0 and 1 used within the last 2 steps
    vq(near(2)), vq(near(2)), vq(near(2))
    assert vq.window_usage() == 0.25  # only code 2 is recent now
    out = vq.eval()(torch.cat([near(0), near(1), near(2), near(3)]))
    assert torch.allclose(out.metrics["perplexity"], torch.tensor(4.0))


@pytest.mark.parametrize("bad", [{"codebook_size": 0}, {"codebook_update": "adam"}, {"decay": 1.5}])
def test_bad_arguments_name_the_key(bad):
    with pytest.raises(ConfigValueError, match=next(iter(bad))):
        make(**bad)
