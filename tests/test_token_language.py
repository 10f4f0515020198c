"""Token-language statistics against known values: i.i.d. uniform tokens, a Markov chain with a known
transition matrix, a grid that its left and upper neighbours determine, Heaps' law on streams whose
vocabulary growth is known, and compression of a constant stream."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from imagetok.evaluation.token_language import (compression, conditional_entropy_left, conditional_entropy_left_up,
                                                heaps_curve, heaps_fit, held_out_bigram_perplexity, language_statistics,
                                                mutual_information, serialize, shard_language_statistics,
                                                token_language_statistics)
from imagetok.evaluation.token_sample import TokenSample

V = 8


@pytest.fixture(scope="module")
def uniform() -> torch.Tensor:
    """1200 grids of 16 x 16 i.i.d. uniform codes over V = 8: 307,200 tokens."""
    return torch.randint(0, V, (1200, 16, 16), generator=torch.Generator().manual_seed(0))


def test_uniform_tokens_are_unpredictable_and_incompressible(uniform):
    s = token_language_statistics(uniform, V)
    bound = math.log2(V)  # 3 bits
    assert s["layout"] == "grid" and s["images"] == 1200 and s["tokens"] == 1200 * 256 and s["left_up_contexts"] == 64
    assert s["unigram_entropy_bits"] == pytest.approx(bound, abs=1e-3)
    # plug-in bias (512 - 64) cells / (2 n ln 2) ~ 1e-3 bits at most, below the tolerance
    assert s["conditional_entropy_left_up_bits"] == pytest.approx(bound, abs=5e-3)
    assert s["conditional_entropy_left_bits"] == pytest.approx(bound, abs=2e-3)
    assert s["bigram_perplexity"] == pytest.approx(V, abs=0.02)
    assert s["split_half_bigram_perplexity"] == pytest.approx(V, abs=0.02)  # add-1 model of 600 images, 600 others
    assert len(s["mutual_information_bits"]) == 8 and max(s["mutual_information_bits"]) < 2e-3  # bias 49 / (2 n ln 2)
    assert s["serialized_bytes_per_token"] == 1.0 and s["raw_bits_per_token"] == 3.0
    for name in ("zlib", "lzma"):  # no compressor beats the entropy of i.i.d. tokens
        assert s[f"{name}_bits_per_token"] >= bound - 0.02, name
        assert s[f"{name}_ratio"] == pytest.approx(3.0 / s[f"{name}_bits_per_token"])
    assert s["heaps_distinct"][-1] == V and s["heaps_tokens"][-1] == 1200 * 256
    json.dumps(s, allow_nan=False)  # plain numbers all through
    assert all(type(v) in (str, int, float, list) for v in s.values())


def test_held_out_bigram_perplexity(uniform):
    assert held_out_bigram_perplexity(uniform[:600], uniform[600:], V) == pytest.approx(V, abs=0.02)
    # fitted on (0,0), (0,0): q(1 | 0) = (0 + 1) / (2 + 1 * 4), so the perplexity of the one bigram (0, 1) is 6
    assert held_out_bigram_perplexity(torch.tensor([[0, 0, 0]]), torch.tensor([[0, 1]]), 4) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="alpha"):
        held_out_bigram_perplexity(uniform, uniform, V, alpha=0.0)


def test_codes_of_large_codebooks_give_the_same_numbers(uniform):
    """Only which codes are equal matters: relabelled into 2^18 or 2^62 codes, every entropy is the same."""
    small = uniform[:200]
    for size in (2**18, 2**62):
        labels = torch.randint(0, size, (V,), generator=torch.Generator().manual_seed(1))
        assert labels.unique().numel() == V
        big = labels[small]
        assert conditional_entropy_left_up(big) == pytest.approx(conditional_entropy_left_up(small), abs=1e-12)
        assert mutual_information(big, 3) == pytest.approx(mutual_information(small, 3), abs=1e-12)
        s = token_language_statistics(big, size)
        assert s["raw_bits_per_token"] == math.log2(size)
        assert s["serialized_bytes_per_token"] == (3 if size == 2**18 else 8)


def _markov(transition: torch.Tensor, stationary: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """n chains of ``length`` steps started in the stationary distribution: LongTensor [n, length]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.multinomial(stationary, n, replacement=True, generator=g)
    for t in range(1, length):
        x[:, t] = torch.multinomial(transition[x[:, t - 1]], 1, generator=g)[:, 0]
    return x


def test_markov_chain_entropy_perplexity_and_mutual_information_are_exact():
    P = torch.tensor([[0.70, 0.10, 0.10, 0.10], [0.10, 0.60, 0.20, 0.10],
                      [0.05, 0.05, 0.80, 0.10], [0.20, 0.20, 0.20, 0.40]], dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eig(P.T)
    pi = eigenvectors[:, eigenvalues.real.argmax()].real
    pi = pi / pi.sum()
    row_entropy = -(P * P.log2()).sum(dim=1)
    entropy = float((pi * row_entropy).sum())

    def exact_mi(d: int) -> float:
        Pd = torch.linalg.matrix_power(P, d)
        return float((pi[:, None] * Pd * (Pd / pi[None, :]).log2()).sum())

    chains = _markov(P, pi, 4000, 64, seed=0)  # 256,000 tokens
    s = token_language_statistics(chains, 4)
    assert s["layout"] == "sequence" and "conditional_entropy_left_up_bits" not in s
    assert s["conditional_entropy_left_bits"] == pytest.approx(entropy, abs=0.01)
    assert s["bigram_entropy_bits"] == s["conditional_entropy_left_bits"]  # a sequence has no row wraps
    assert s["bigram_perplexity"] == pytest.approx(2**entropy, rel=0.01)
    assert s["split_half_bigram_perplexity"] == pytest.approx(2**entropy, rel=0.01)
    expected = [exact_mi(d) for d in range(1, 9)]
    assert expected[0] > 0.3 and expected[-1] < expected[0] / 4  # a decaying dependence, worth measuring
    assert s["mutual_information_bits"] == pytest.approx(expected, abs=0.01)  # sampling sd ~0.003 bits
    # rows of a grid as the chains: mutual information is measured along rows, at horizontal distance d
    grid = chains.reshape(1000, 4, 64)[:, :, :16]
    assert mutual_information(grid, 8) == pytest.approx(expected, abs=0.015)  # a quarter of the pairs
    assert conditional_entropy_left(grid) == pytest.approx(entropy, abs=0.01)


def test_a_grid_its_left_and_upper_neighbours_determine():
    size = 16
    field = torch.randint(0, size, (500, 16, 16), generator=torch.Generator().manual_seed(2))
    for r in range(1, 16):
        for c in range(1, 16):
            field[:, r, c] = (field[:, r, c - 1] + field[:, r - 1, c]) % size
    assert conditional_entropy_left_up(field) == pytest.approx(0.0, abs=1e-9)
    assert conditional_entropy_left(field) > 3.9  # of at most log2 16 = 4: the left neighbour alone says little


def test_heaps_law_of_known_vocabulary_growth(uniform):
    seen, distinct = heaps_curve(uniform)
    assert seen[0] == 1 and distinct[0] == 1 and max(distinct) == V == distinct[-1]
    assert all(a <= b for a, b in zip(distinct, distinct[1:]))
    # a new code exactly when ceil(sqrt(n)) grows: V(n) = ceil(n^0.5) at every n
    n = torch.arange(1, 100_001)
    vocabulary = torch.ceil(n.double().sqrt()).long()
    new = torch.cat([torch.tensor([True]), vocabulary[1:] > vocabulary[:-1]])
    stream = torch.where(new, vocabulary - 1, torch.zeros_like(vocabulary))
    seen, distinct = heaps_curve(stream, 40)
    assert distinct == [math.ceil(math.sqrt(k)) for k in seen]
    beta, k = heaps_fit(seen, distinct)
    assert beta == pytest.approx(0.5, abs=0.03) and k == pytest.approx(1.0, abs=0.2)
    seen, distinct = heaps_curve(torch.full((5000,), 3))
    assert set(distinct) == {1} and heaps_fit(seen, distinct) == pytest.approx((0.0, 1.0))


def test_compression_of_a_constant_stream_and_the_serialized_bytes():
    constant = compression(torch.full((100_000,), 5), 1024)
    assert constant["raw_bits_per_token"] == 10.0 and constant["serialized_bytes_per_token"] == 2.0
    assert constant["zlib_bits_per_token"] < 0.05 and constant["lzma_bits_per_token"] < 0.05
    assert constant["zlib_ratio"] > 200 and constant["lzma_ratio"] > 200
    assert serialize(torch.tensor([1, 258]), 2**18) == bytes([1, 0, 0, 2, 1, 0])  # 3 bytes, little-endian
    assert serialize(torch.tensor([255]), 256) == bytes([255]) and len(serialize(torch.tensor([0]), 257)) == 2


def _write_shards(directory, tokens: np.ndarray, shard_size: int, codebook_sizes: list[int]) -> None:
    """A shard directory as tokenize_dataset writes it (the keys TokenShards reads)."""
    directory.mkdir()
    files = []
    for k, first in enumerate(range(0, len(tokens), shard_size)):
        np.save(directory / f"tokens-{k:05d}.npy", tokens[first:first + shard_size].astype(np.uint16))
        files.append({"file": f"tokens-{k:05d}.npy", "first": first, "count": len(tokens[first:first + shard_size])})
    (directory / "index.json").write_text(json.dumps({
        "codebook_sizes": codebook_sizes, "token_shape": list(tokens.shape[1:]), "dtype": "uint16",
        "num_images": len(tokens), "shard_size": shard_size, "shards": files}))


def test_every_sub_codebook_of_indices_and_of_shards(uniform, tmp_path):
    indices = torch.stack([uniform[:50], uniform[50:100] % 3], dim=-1)  # [50, 16, 16, K=2]
    per_codebook = language_statistics(indices, [V, 3])
    assert per_codebook == [token_language_statistics(uniform[:50], V),
                            token_language_statistics(uniform[50:100] % 3, 3)]
    assert per_codebook[1]["unigram_entropy_bits"] <= math.log2(3)
    _write_shards(tmp_path / "tokens", indices.numpy(), shard_size=16, codebook_sizes=[V, 3])
    assert shard_language_statistics(tmp_path / "tokens") == per_codebook
    assert shard_language_statistics(tmp_path / "tokens", max_images=20) == language_statistics(indices[:20], [V, 3])
    sequences = language_statistics(indices[:, 0], [V, 3])  # [N, L, K]: 1D sequences
    assert [s["layout"] for s in sequences] == ["sequence", "sequence"]
    with pytest.raises(ValueError, match="K = 3"):
        language_statistics(indices, [V, 3, 3])


def test_token_sample_keeps_the_first_images_in_order():
    sample = TokenSample(5, [V])
    for first in (0, 3, 6):
        sample.update(torch.arange(first, first + 3).reshape(3, 1, 1).expand(3, 2, 1))
    kept = sample.gathered()
    assert kept.dtype == torch.long and kept.shape == (5, 2, 1) and kept[:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert TokenSample(None, [V]).gathered() is None and TokenSample(3, [2**40]).dtype == torch.int64
