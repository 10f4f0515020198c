"""Exact codebook usage for any sub-codebook size (imagetok/evaluation/codebook.py): dense tables and
sparse (code, count) pairs give the same counts, a 2^62-code sub-codebook costs no memory up front,
the counts sum over ranks (also from a rank without any update), and a tokenizer with 2^48 codes per
sub-token evaluates and tokenizes."""

from __future__ import annotations

import pytest
import torch

from imagetok.evaluation import codebook
from imagetok.evaluation.codebook import CodebookUsage
from imagetok.evaluation.tokens import token_statistics

SIZES = [16, 2**40, 2**62]


def _indices(seed: int, n: int = 300) -> torch.Tensor:
    """``[n, 3]`` indices for SIZES, few distinct codes in the large sub-codebooks (so repeats are counted)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 16, (n,), generator=g)
    large = torch.randint(0, 50, (n,), generator=g) * (2**40 // 50)
    huge = 2**62 - 1 - torch.randint(0, 40, (n,), generator=g)  # codes above 2^61: no int32/float32 rounding
    return torch.stack([small, large, huge], dim=1)


def _expected(indices: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    codes, counts = indices[:, k].unique(return_counts=True)
    return codes.tolist(), counts.tolist()


def test_dense_and_sparse_counts_are_exact_and_the_same():
    batches = [_indices(s) for s in range(3)]
    every = torch.cat(batches)
    dense, sparse = CodebookUsage([16, 16]), CodebookUsage([16, 16], dense_limit=8)
    assert dense.dense == [True, True] and sparse.dense == [False, False]
    for b in batches:
        dense.update(b[:, :1].expand(-1, 2).reshape(-1, 10, 2))  # any leading shape [..., K]
        sparse.update(b[:, :1].expand(-1, 2).reshape(-1, 10, 2))
    for a, b in zip(dense.per_codebook(), sparse.per_codebook()):
        assert a.codes.tolist() == b.codes.tolist() == _expected(every, 0)[0]
        assert a.counts.tolist() == b.counts.tolist() == _expected(every, 0)[1]
        assert torch.equal(a.dense(), torch.bincount(every[:, 0], minlength=16))
    assert float(dense.compute()) == float(sparse.compute()) == every[:, 0].unique().numel() / 16
    # token statistics from the used codes alone equal those from the full table
    c = sparse.per_codebook()[0]
    assert token_statistics(c.counts, c.codebook_size) == token_statistics(c.dense())


def test_huge_sub_codebooks_are_counted_sparsely_with_memory_bounded_by_the_codes_seen(monkeypatch):
    monkeypatch.setattr(codebook, "_COMPACT_EVERY", 4)
    usage = CodebookUsage(SIZES)  # 2^62 codes: nothing allocated per code
    assert usage.dense == [True, False, False]
    assert sum(t.numel() for t in usage.metric_state.values() if isinstance(t, torch.Tensor)) == 16
    batches = [_indices(s) for s in range(10)]
    for b in batches:
        usage.update(b)
    assert len(usage.pairs_1) < 4  # merged every 4 updates: one row per distinct code, not per token
    every = torch.cat(batches)
    per = usage.per_codebook()
    for k in range(3):
        assert (per[k].codes.tolist(), per[k].counts.tolist()) == _expected(every, k)
        assert per[k].codebook_size == SIZES[k]
    stats = token_statistics(per[2].counts, per[2].codebook_size)
    assert stats["usage"] == 40 / 2**62 and stats["tokens"] == 3000 and stats["codebook_size"] == 2**62
    expected = (every[:, 0].unique().numel() / 16 + 50 / 2**40 + 40 / 2**62) / 3
    assert float(usage.compute()) == pytest.approx(expected, rel=1e-6)
    usage.reset()
    assert usage.per_codebook()[2].codes.numel() == 0 and usage.pairs_2 == []


def _sync(usage: CodebookUsage, gather) -> None:
    usage.sync(dist_sync_fn=gather, distributed_available=lambda: True)


def test_counts_sum_over_ranks_even_when_one_rank_saw_nothing():
    """Two ranks' syncs, with recorded all-gathers in place of torch.distributed's: rank 1 has nothing
    to count, yet every tensor it offers matches rank 0's in dtype and dimensions (a real all_gather
    needs that; torchmetrics' own placeholder for an empty list state is a 1D float tensor), and after
    the sync both ranks hold the counts of both."""
    ranks = [CodebookUsage(SIZES), CodebookUsage(SIZES)]
    for s in range(2):
        ranks[0].update(_indices(s))
    offered: list[list[torch.Tensor]] = [[], []]
    for r, usage in enumerate(ranks):  # what each rank hands to the gathers, in order
        _sync(usage, lambda tensor, group=None, r=r: offered[r].append(tensor) or [tensor, tensor])
        usage.unsync()
    assert len(offered[0]) == len(offered[1]) == 3
    for mine, theirs in zip(*offered):
        assert mine.dtype == theirs.dtype == torch.long and mine.ndim == theirs.ndim
    every = torch.cat([_indices(0), _indices(1)])
    for r, usage in enumerate(ranks):
        calls = iter(range(3))
        _sync(usage, lambda tensor, group=None: [offered[0][i := next(calls)], offered[1][i]])
        assert [(c.codes.tolist(), c.counts.tolist()) for c in usage.per_codebook()] == \
            [_expected(every, k) for k in range(3)]
        usage.unsync()
    assert ranks[1].per_codebook()[1].codes.numel() == 0  # back to the rank's own (empty) counts


def test_a_48_bit_sub_token_tokenizer_evaluates_and_tokenizes_without_a_table_per_code(tmp_path):
    """A binary tokenizer whose one sub-token holds 48 bits (2^48 codes: one int64 per code would be
    2 PiB): evaluate.py counts its tokens exactly and tokenize_dataset stores them as int64."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONFIGS
    from imagetok.data.token_shards import TokenShards
    from imagetok.evaluation.run import evaluate
    from imagetok.tokenize_dataset import tokenize
    from imagetok.tokenizer import Tokenizer
    from imagetok.training.run import tokenizer_config
    from test_train_variants import TINY

    def _compose(name, overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            return compose(name, overrides=overrides)

    torch.manual_seed(0)
    wide = ["quantizer=lfq", "quantizer.dim=8", "quantizer.bits=48", "quantizer.bits_per_token=null"]
    tok = Tokenizer.from_config(tokenizer_config(_compose("train", [*TINY, *wide]))).eval()
    assert tok.codebook_sizes == [2**48]
    directory = tok.save_pretrained(tmp_path / "tok")
    data = ["data.image_size=16", "data.val_samples=6"]
    results = evaluate(_compose("evaluate", [f"checkpoint={directory}", *data, "eval.metrics=[psnr,tokens]",
                                             "eval.num_images=6"]), tmp_path / "eval")
    out = tokenize(_compose("tokenize_dataset", [f"pretrained={directory}", f"out={tmp_path / 'tokens'}", *data,
                                                 "split=val", "shard_size=4", "batch_size=4"]))
    shards = TokenShards(out)
    ids = shards.all()
    assert shards.index["dtype"] == "int64" and ids.shape == (6, 8, 8, 1) and int(ids.max()) >= 2**31
    with torch.no_grad():
        assert torch.equal(ids, tok.encode(torch.stack(_val_images(_compose("evaluate", data)))))
    stats = results["tokens"][0]
    assert stats["codebook_size"] == 2**48 and stats["tokens"] == 6 * 64
    assert stats["usage"] == ids.unique().numel() / 2**48
    assert (tmp_path / "eval" / "codebook_usage.png").stat().st_size > 0


def _val_images(cfg) -> list[torch.Tensor]:
    from imagetok.data.sample import SampleDataModule

    dataset = SampleDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"}).val_dataset()
    return [dataset[i] for i in range(len(dataset))]
