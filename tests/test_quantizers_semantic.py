"""Teacher-aligned families: factorized VQ (FQGAN) and dual codebooks (TokenFlow shared / DualToken separate
mapping), the semantic alignment loss and its teachers, and the recipes that train them from the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import train_recipe
from imagetok.errors import ConfigValueError, MissingWeightsError
from imagetok.losses.discriminator import PatchGANDiscriminator
from imagetok.losses.semantic import SemanticAlignmentLoss
from imagetok.losses.vqgan import VQGANLoss
from imagetok.nets.teachers import RandomCNNTeacher, TorchvisionTeacher
from imagetok.quantizers.dual import DualCodebookQuantizer, shared_nearest_code
from imagetok.quantizers.factorized import FactorizedVectorQuantizer, squared_cosine_overlap
from test_train_variants import SAMPLE, TINY

TRAINING = {"codebook_update": "ema", "kmeans_init_batches": 2, "dead_code_threshold": 2.0, "l2_normalize": False}
FAMILIES = {
    "fqgan": (lambda **kw: FactorizedVectorQuantizer(dim=8, num_codebooks=3, codebook_size=[16, 32, 8], sub_dim=4,
                                                     semantic_dim=6, aligned_codebooks=[0, 2], **kw), [16, 32, 8], 12),
    "tokenflow": (lambda **kw: DualCodebookQuantizer(dim=8, semantic_dim=6, codebook_size=16, semantic_code_dim=4,
                                                     pixel_code_dim=6, mapping="shared", **kw), [16], 6),
    "tokenflow_both": (lambda **kw: DualCodebookQuantizer(dim=8, semantic_dim=6, codebook_size=16, semantic_code_dim=4,
                                                          pixel_code_dim=6, decoder_input="both", **kw), [16], 10),
    "dualtoken": (lambda **kw: DualCodebookQuantizer(dim=8, semantic_dim=6, codebook_size=16, pixel_codebook_size=32,
                                                     mapping="separate", decoder_input="both", **kw), [16, 32], 16),
}


def _latents(n: int, seed: int) -> torch.Tensor:
    """Clustered latents [n, 8, 4, 4] (a mixture of 6 Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 8, generator=torch.Generator().manual_seed(99)) * 2
    pick = torch.randint(0, 6, (n, 4, 4), generator=g)
    return (centres[pick] + 0.5 * torch.randn(n, 4, 4, 8, generator=g)).permute(0, 3, 1, 2)


def _trained(name: str, steps: int = 6, **kw):
    torch.manual_seed(0)
    q = FAMILIES[name][0](**(TRAINING | kw)).train()
    for step in range(steps):  # k-means, EMA updates and restarts (threshold 2 revives codes every step)
        q(_latents(8, step))
    return q


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sizes_ranges_exact_inverse_and_bf16_indices(name):
    q = _trained(name)
    sizes, out_dim = FAMILIES[name][1:]
    assert q.codebook_sizes == sizes and q.out_dim == out_dim
    q.eval()
    z = _latents(16, 100)
    out = q(z)
    assert out.indices.shape == (16, 4, 4, len(sizes)) and out.z_q.shape == (16, out_dim, 4, 4)
    for k, size in enumerate(sizes):
        assert int(out.indices[..., k].min()) >= 0 and int(out.indices[..., k].max()) < size
    assert torch.equal(q.indices_to_latents(out.indices), out.z_q)
    seq = q(z.flatten(2).transpose(1, 2))  # [B, N, C] sequence layout
    assert torch.equal(q.indices_to_latents(seq.indices, channels_last=True), seq.z_q)
    assert torch.equal(seq.indices.reshape(out.indices.shape), out.indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = q(z)
    assert torch.equal(mixed.indices, out.indices) and mixed.z_q.dtype == torch.float32
    with pytest.raises(ConfigValueError, match="indices"):
        q.indices_to_latents(torch.zeros(1, 2, 2, len(sizes) + 1, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gradients_reach_encoder_and_semantic_heads_and_metrics_are_per_codebook(name):
    q = FAMILIES[name][0]().train()
    encoder = torch.nn.Conv2d(3, 8, 1)
    out = q(encoder(torch.randn(2, 3, 4, 4)))
    semantic = [v for k, v in out.features.items() if k.startswith("semantic")]
    assert semantic and all(f.shape == (2, 6, 4, 4) for f in semantic)
    (out.z_q.pow(2).sum() + out.loss + sum(f.sum() for f in semantic)).backward()
    assert encoder.weight.grad.abs().sum() > 0
    heads = q.heads.parameters() if name == "fqgan" else q.semantic_head.parameters()
    assert all(p.grad is not None for p in heads)
    keys = [f"usage/sub{k}" for k in range(len(q.codebook_sizes))] if len(q.codebook_sizes) > 1 else ["usage"]
    assert all(k in out.metrics for k in keys) and all(not v.requires_grad for v in out.metrics.values())
    assert any(k.startswith("perplexity") for k in out.metrics)


def test_factorized_features_heads_and_disentanglement():
    q = FAMILIES["fqgan"][0]().train()
    out = q(torch.randn(2, 8, 4, 4))
    assert sorted(out.features) == ["semantic/0", "semantic/2"] and "disentangle" in out.metrics
    assert FactorizedVectorQuantizer(dim=8, semantic_dim=None)(torch.randn(1, 8, 2, 2)).features == {}
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(squared_cosine_overlap([a, a.flip(1)])) == 0.0  # orthogonal sub-codes at every position
    assert math.isclose(float(squared_cosine_overlap([a, -3 * a])), 1.0, rel_tol=1e-6)  # parallel ones
    sub = q.sub_latents(out.indices, 1)
    assert sub.shape == (2, 4, 4, 4) and torch.equal(sub, out.z_q[:, 4:8])
    with pytest.raises(ConfigValueError, match="aligned_codebooks"):
        FactorizedVectorQuantizer(dim=8, num_codebooks=2, semantic_dim=4, aligned_codebooks=[2])


def test_shared_mapping_picks_the_weighted_joint_nearest_code_and_retrieves_both_embeddings():
    g = torch.Generator().manual_seed(0)
    xs, cs, xp, cp = (torch.randn(n, d, generator=g) for n, d in ((50, 4), (16, 4), (50, 6), (16, 6)))
    for w in (0.3, 1.0, 5.0):
        brute = (w * torch.cdist(xs, cs).pow(2) + torch.cdist(xp, cp).pow(2)).argmin(1)
        assert torch.equal(shared_nearest_code(xs, cs, xp, cp, w, max_elements=64), brute)  # blocks of 4 rows
    q = _trained("tokenflow_both").eval()
    out = q(_latents(4, 50))
    assert torch.equal(q.semantic_latents(out.indices), out.z_q[:, 6:])  # one token -> both embeddings
    assert q.semantic_latents(out.indices, teacher_space=True).shape == (4, 6, 4, 4)
    with pytest.raises(ConfigValueError, match="pixel_codebook_size"):
        DualCodebookQuantizer(dim=8, semantic_dim=4, codebook_size=16, pixel_codebook_size=32, mapping="shared")
    with pytest.raises(ConfigValueError, match="mapping"):
        DualCodebookQuantizer(dim=8, semantic_dim=4, mapping="both")


def test_shared_mapping_restarts_a_dead_code_in_both_codebooks_from_one_position():
    torch.manual_seed(0)
    q = DualCodebookQuantizer(dim=8, semantic_dim=4, codebook_size=64, semantic_code_dim=4, pixel_code_dim=6,
                              codebook_update="ema", dead_code_threshold=100.0, l2_normalize=False).train()
    z = _latents(2, 3)
    q(z)  # initialises (uniform statistics)
    q(z)  # every code's count is below 100: all restarted from positions of this batch
    tokens = z.permute(0, 2, 3, 1).reshape(-1, 8)
    with torch.no_grad():
        pairs = torch.cat([q.semantic_proj(tokens), q.pixel_proj(tokens)], dim=1)  # [32, 10]
    codes = torch.cat([q.semantic_codebook.codebook, q.pixel_codebook.codebook], dim=1)  # [64, 10]
    assert (codes[:, None] - pairs[None]).abs().amax(-1).min(1).values.max() < 1e-6  # every (semantic, pixel) pair is one position's
    assert torch.equal(q.semantic_codebook.cluster_size, q.pixel_codebook.cluster_size)


def test_shared_mapping_kmeans_initialises_both_codebooks_jointly():
    q = _trained("tokenflow", steps=3)
    assert bool(q.semantic_codebook.initialized) and bool(q.pixel_codebook.initialized)
    assert int(q.semantic_codebook.step) == int(q.pixel_codebook.step) == 2  # 2 pooling batches, then updates


def test_semantic_loss_is_one_minus_cosine_on_the_token_grid():
    teacher = RandomCNNTeacher(out_dim=6, num_layers=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    target = F.adaptive_avg_pool2d(teacher(images), (4, 4))  # 8x8 teacher grid -> 4x4 tokens
    loss_fn = SemanticAlignmentLoss(teacher, weight=2.0)
    loss, logs = loss_fn(images, {"semantic/0": target * 3, "semantic/1": -target, "other": torch.zeros(1)})
    assert math.isclose(float(logs["cosine_distance/semantic/0"]), 0.0, abs_tol=1e-5)
    assert math.isclose(float(logs["cosine_distance/semantic/1"]), 2.0, abs_tol=1e-5)
    assert math.isclose(float(loss), 2.0 * 2.0, abs_tol=1e-4)
    with pytest.raises(ConfigValueError, match="quantizer.semantic_dim"):
        loss_fn(images, {"semantic": torch.zeros(2, 5, 4, 4)})
    with pytest.raises(ConfigValueError, match="loss.semantic"):
        loss_fn(images, {})


def test_teacher_stays_out_of_the_objective_module_tree_and_is_frozen():
    teacher = RandomCNNTeacher(out_dim=6)
    loss = VQGANLoss(discriminator=PatchGANDiscriminator(ch=8, n_layers=1), perceptual_weight=0.0,
                     disc_weight=0.0, semantic=SemanticAlignmentLoss(teacher))
    assert not any("net." in k for k in loss.state_dict()) and len(list(loss.parameters())) == len(
        list(loss.discriminator.parameters()))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.train().training
    q = FAMILIES["tokenflow"][0]().train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    quant = q(torch.randn(2, 8, 4, 4, requires_grad=True))
    total, logs = loss.generator_loss(images, images, quant, step=0)
    assert {"semantic", "cosine_distance/semantic"} <= set(logs)
    assert math.isclose(float(total), float(quant.loss + logs["semantic"]), rel_tol=1e-5)  # pixel term is 0
    total.backward()
    assert all(p.grad is not None for p in q.semantic_head.parameters())
    assert torch.equal(RandomCNNTeacher(out_dim=6)(images), teacher(images))  # seeded: rebuilt identically


def test_torchvision_teacher_loads_a_local_file_and_missing_weights_is_one_line(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    teacher = TorchvisionTeacher("resnet18", weights_path=str(path), layer="layer3", input_size=64)
    assert teacher.out_dim == 256 and teacher(torch.zeros(1, 3, 32, 32)).shape == (1, 256, 4, 4)
    for arch in ("resnet50", "vit_b_16"):
        with pytest.raises(MissingWeightsError) as err:
            TorchvisionTeacher(arch)
        message = str(err.value)
        assert "\n" not in message and "hub" in message and "weights_path" in message
        assert ("resnet50-11ad3fa6.pth" if arch == "resnet50" else "vit_b_16-c867db91.pth") in message
    with pytest.raises(ConfigValueError, match="layer"):
        TorchvisionTeacher("resnet18", weights_path=str(path), layer="tokens")


@pytest.mark.parametrize("recipe,k", [("cpu_fqgan", 2), ("cpu_tokenflow", 1), ("cpu_dualtoken", 2)])
def test_recipes_train_end_to_end(compose_config, tmp_path, recipe, k):
    run, tok, images, ids = train_recipe(compose_config, tmp_path, [f"experiment={recipe}", *TINY, *SAMPLE,
                                                                     "trainer.max_steps=8", "loss.disc_start=4",
                                                                     "quantizer.codebook_size=64"], 8)
    assert ids.shape[-1] == k == len(tok.codebook_sizes)
    logged = run.trainer.logged_metrics
    assert any(key.startswith("train/semantic") for key in logged), sorted(logged)
