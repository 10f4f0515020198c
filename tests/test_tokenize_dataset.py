"""Token shards: encode a split into shards, resume after interruption, split across ranks, read back."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS
from imagetok import Tokenizer
from imagetok.data.sample import SampleDataModule
from imagetok.data.token_shards import TokenShards, token_dtype
from imagetok.errors import ConfigValueError
from imagetok.tokenize_dataset import tokenize
from imagetok.training.run import tokenizer_config


def _compose(name, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(tokenizer_config(_compose("train", []))).eval()
    return tok, tok.save_pretrained(tmp_path / "tok")


def _cfg(pretrained_dir, out, *extra):
    return _compose("tokenize_dataset", [f"pretrained={pretrained_dir}", f"out={out}", "num_images=50", "shard_size=16",
                                         "batch_size=8", *extra])


def test_shards_hold_what_encode_returns_and_resume_skips_complete_shards(pretrained, tmp_path):
    tok, directory = pretrained
    out = tokenize(_cfg(directory, tmp_path / "tokens"))
    shards = TokenShards(out)
    assert len(shards) == 50 and shards.index["dtype"] == "uint16" and shards.index["token_shape"] == [8, 8, 1]
    cfg = _compose("train", [])
    data = SampleDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    images = torch.stack([data.train_dataset()[i] for i in range(50)])
    assert torch.equal(shards.all(), tok.encode(images))
    assert torch.equal(shards[17], tok.encode(images[17:18])[0])
    assert np.load(out / "tokens-00000.npy").dtype == np.uint16

    # interrupted: one shard missing, a temporary file left behind; the rerun writes only that shard
    (out / "tokens-00002.npy").unlink()
    (out / "tokens-00002.npy.tmp").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="not written yet"):
        TokenShards(out)
    kept = {name: (out / name).stat().st_mtime_ns for name in ("tokens-00000.npy", "tokens-00001.npy", "tokens-00003.npy")}
    tokenize(_cfg(directory, out))
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert torch.equal(TokenShards(out).all(), tok.encode(images))


def test_ranks_write_disjoint_shards_that_together_are_complete(pretrained, tmp_path, monkeypatch):
    tok, directory = pretrained
    out = tmp_path / "tokens"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        tokenize(_cfg(directory, out))
        if rank == 1:  # rank 1 alone wrote the odd shards
            assert sorted(p.name for p in out.glob("tokens-*.npy")) == ["tokens-00001.npy", "tokens-00003.npy"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    single = tokenize(_cfg(directory, tmp_path / "single"))
    assert torch.equal(TokenShards(out).all(), TokenShards(single).all())


def test_another_tokenizer_cannot_write_into_the_same_directory(pretrained, tmp_path):
    tok, directory = pretrained
    tokenize(_cfg(directory, tmp_path / "tokens"))
    torch.manual_seed(1)
    other = Tokenizer.from_config(tokenizer_config(_compose("train", []))).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigValueError, match="tokenizer_sha256 differs"):
        tokenize(_cfg(other, tmp_path / "tokens"))


def test_token_dtype_widens_only_when_needed():
    assert token_dtype([1024]) == np.uint16 and token_dtype([65_535, 16]) == np.uint16
    assert token_dtype([65_536]) == np.int32 and token_dtype([2**16, 2**18]) == np.int32
    # binary sub-tokens of 32 bits and more: codes from 2^31 on overflow int32
    assert token_dtype([2**31]) == np.int32 and token_dtype([2**31 + 1]) == np.int64
    assert token_dtype([2**32] * 4) == np.int64 and token_dtype([16, 2**62]) == np.int64
    codes = np.array([0, 2**31, 2**62 - 1])
    assert (codes.astype(token_dtype([2**62])) == codes).all()
