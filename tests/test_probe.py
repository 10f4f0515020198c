"""The AR probe (issue 18): token shards with labels, the shard datamodule, the probe's model on every
token layout, the control experiments, and the command line end to end.

Shards are made here: synthetic tokens with a strong left-neighbour dependency (so that structure is
there to find, fast), their position-shuffled copy (the control), and a tiny ImageFolder tree tokenized
by a tiny random tokenizer (labels, decoding, gFID against the source images)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from conftest import CONFIGS
from imagetok import Tokenizer
from imagetok.data.token_shards import (INDEX_NAME, ShardBatches, ShardBatchLoader, TokenShardDataModule, TokenShards,
                                        label_shard_name, shard_name)
from imagetok.errors import ConfigValueError
from imagetok.probe.gpt import ProbeGPT
from imagetok.probe.layout import TokenLayout
from imagetok.tokenize_dataset import tokenizer_identity

# 32 px -> 8x8 tokens from 16 codes
TINY_TOKENIZER = {
    "encoder": {"_target_": "imagetok.nets.cnn.Encoder", "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                "attn_resolutions": [], "z_channels": 4},
    "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "codebook_size": 16, "dim": 4},
    "decoder": {"_target_": "imagetok.nets.cnn.Decoder", "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                "attn_resolutions": [], "z_channels": 4}}
SAMPLE_DATA = {"_target_": "imagetok.data.sample.SampleDataModule", "image_size": 32, "batch_size": 16,
               "train_samples": 1000, "val_samples": 64, "seed": 0}


def compose_config(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


def write_shards(out: Path, tokens: np.ndarray, *, sha: str = "synthetic", pretrained: str = "none",
                 codebook_sizes: list[int], shard_size: int = 64, labels: np.ndarray | None = None,
                 split: str = "train", **index_extra) -> Path:
    """A shard directory as tokenize_dataset writes it, from ``tokens`` ``[N, *token_shape]``."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(tokens)
    shards = []
    for k in range(-(-n // shard_size)):
        part = slice(k * shard_size, (k + 1) * shard_size)
        np.save(out / shard_name(k), tokens[part].astype(np.uint16))
        if labels is not None:
            np.save(out / label_shard_name(k), labels[part].astype(np.int64))
        shards.append({"file": shard_name(k), "first": k * shard_size, "count": len(tokens[part])})
    index = {"tokenizer_sha256": sha, "pretrained": pretrained, "codebook_sizes": codebook_sizes,
             "token_shape": list(tokens.shape[1:]), "dtype": "uint16", "num_images": n, "shard_size": shard_size,
             "split": split, "data": SAMPLE_DATA, "shards": shards, **index_extra}
    if labels is not None:
        index["num_classes"] = int(labels.max()) + 1
        index["label_names"] = [f"class{c}" for c in range(index["num_classes"])]
    (out / INDEX_NAME).write_text(json.dumps(index))
    return out


def left_neighbour_tokens(n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 8, 8, 1]`` codes in [0, 16): each row starts at random, then each token is its left
    neighbour + 1 (mod 16) with probability 0.9, else random: about 0.87 bits per token given the left
    neighbour against 4 bits of unigram entropy."""
    x = np.zeros((n, 8, 8), np.int64)
    x[:, :, 0] = rng.integers(0, 16, (n, 8))
    for j in range(1, 8):
        follow = rng.random((n, 8)) < 0.9
        x[:, :, j] = np.where(follow, (x[:, :, j - 1] + 1) % 16, rng.integers(0, 16, (n, 8)))
    return x[..., None]


def shuffle_within_images(tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same tokens of each image at randomly permuted positions: code frequencies kept, structure gone."""
    flat = tokens.reshape(len(tokens), -1)
    return np.stack([row[rng.permutation(len(row))] for row in flat]).reshape(tokens.shape)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny tokenizer (saved) and synthetic shard directories: structured, position-shuffled, 4 classes."""
    root = tmp_path_factory.mktemp("probe_shards")
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_config(TINY_TOKENIZER).eval()
    pretrained = tokenizer.save_pretrained(root / "tokenizer")
    common = {"sha": tokenizer_identity(tokenizer), "pretrained": str(pretrained), "codebook_sizes": [16]}
    rng = np.random.default_rng(0)
    train, val = left_neighbour_tokens(512, rng), left_neighbour_tokens(128, rng)
    dirs = {"train": write_shards(root / "train", train, **common),
            "val": write_shards(root / "val", val, split="val", **common),
            "shuffled_train": write_shards(root / "shuffled_train", shuffle_within_images(train, rng), **common),
            "shuffled_val": write_shards(root / "shuffled_val", shuffle_within_images(val, rng), split="val", **common)}
    labels = np.arange(48) % 4
    dirs["labelled_train"] = write_shards(root / "labelled_train", train[:48], labels=labels, **common)
    dirs["labelled_val"] = write_shards(root / "labelled_val", val[:16], labels=labels[:16], split="val", **common)
    dirs["root"], dirs["pretrained"] = root, pretrained
    yield dirs
    GlobalHydra.instance().clear()


# ---- the datamodule --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """48 training items whose tokens are their own index (4 shards of 16, the last partial: 50 in val)."""
    root = tmp_path_factory.mktemp("numbered")
    train = np.repeat(np.arange(48)[:, None, None], 2, axis=1)  # [48, 2, 1]
    val = np.repeat(np.arange(50)[:, None, None], 2, axis=1)
    return (write_shards(root / "train", train, codebook_sizes=[65535], shard_size=16, labels=np.arange(48) % 3),
            write_shards(root / "val", val, codebook_sizes=[65535], shard_size=16, split="val"))


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["tokens"][:, 0, 0].tolist()


def _epoch(directory: Path, epoch: int, rank: int, world: int, workers: int, **kwargs) -> list[list[int]]:
    dataset = ShardBatches(TokenShards(directory), 4, rank=rank, world=world, seed=0, **kwargs)
    loader = ShardBatchLoader(dataset, workers)
    loader.sampler.set_epoch(epoch)  # where Lightning's _set_sampler_epoch finds it
    return [_ids(b) for b in loader]


def test_ranks_and_workers_split_each_epoch_into_disjoint_batches_covering_every_item(numbered):
    train, val = numbered
    per_rank = [_epoch(train, 0, rank, 2, workers=2, shuffle=True, drop_last=True) for rank in (0, 1)]
    assert [len(b) for b in per_rank] == [6, 6]  # 24 items per rank, the same number of batches
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(48))  # each item exactly once over both ranks
    # the workers do not change the data, the epoch does
    assert per_rank[0] == _epoch(train, 0, 0, 2, workers=0, shuffle=True, drop_last=True)
    assert per_rank[0] != _epoch(train, 1, 0, 2, workers=2, shuffle=True, drop_last=True)
    assert sorted(i for b in _epoch(train, 1, 0, 1, workers=0, shuffle=True, drop_last=True) for i in b) == list(range(48))
    # validation: every item once, in order, the last batches smaller
    val_seen = [i for rank in (0, 1) for b in _epoch(val, 0, rank, 2, workers=2, shuffle=False, drop_last=False) for i in b]
    assert sorted(val_seen) == list(range(50))
    batch = TokenShards(train).read(np.array([17, 3, 40]))
    assert batch["tokens"][:, 0, 0].tolist() == [17, 3, 40] and batch["labels"].tolist() == [17 % 3, 0, 40 % 3]


def test_a_restored_loader_continues_the_epoch_with_the_same_batches(numbered):
    train, val = numbered

    def loader():
        datamodule = TokenShardDataModule(train_dir=train, val_dir=val, batch_size=4, num_workers=2, seed=5)
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(3)
        return loader

    straight = loader()
    batches = []
    for batch in straight:
        batches.append(_ids(batch))
        if len(batches) == 5:
            state = straight.state_dict()  # what a checkpoint after 5 steps of this epoch holds
    assert state == {"batches_served": 5, "batch_size": 4} and len(batches) == 12
    restored = loader()
    restored.load_state_dict(state)
    assert [_ids(b) for b in restored] == batches[5:]  # the rest of epoch 3, not its start
    assert [_ids(b) for b in restored] == batches  # and the next pass is whole again


def test_train_and_val_shards_of_different_tokenizers_are_refused(shards, tmp_path):
    other = shutil.copytree(shards["val"], tmp_path / "other")
    index = json.loads((other / INDEX_NAME).read_text())
    (other / INDEX_NAME).write_text(json.dumps({**index, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(ConfigValueError, match="same tokenizer.*tokenizer_sha256 differ"):
        TokenShardDataModule(train_dir=shards["train"], val_dir=other)


# ---- the model on every layout ----------------------------------------------------------------------

LAYOUTS = {  # name: (token_shape, codebook_sizes, subtokens, index extra)
    "grid K=1": ((4, 4, 1), [16], "factorized", {}),
    "grid K=2 factorized": ((4, 4, 2), [16, 8], "factorized", {}),
    "grid K=2 flattened": ((4, 4, 2), [16, 8], "flattened", {}),
    "1D [N, K]": ((6, 2), [16, 8], "factorized", {}),
    "VAR multi-scale": ((14, 1), [32], "factorized", {"scales": [1, 2, 3]}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_one_step_and_samples_its_token_shape(name):
    shape, sizes, subtokens, extra = LAYOUTS[name]
    layout = TokenLayout.from_index({"token_shape": list(shape), "codebook_sizes": sizes, "data": SAMPLE_DATA, **extra})
    assert layout.kind == {3: "grid", 2: "multiscale" if extra else "sequence"}[len(shape)]
    assert (layout.positions, layout.subtokens) == (int(np.prod(shape[:-1])), shape[-1])
    torch.manual_seed(0)
    model = ProbeGPT(codebook_sizes=sizes, positions=layout.positions, subtokens=subtokens, width=16, depth=1, num_heads=2)
    tokens = torch.stack([torch.randint(v, (3, *shape[:-1])) for v in sizes], dim=-1)  # [B, *token_shape]
    sequence = layout.to_sequence(tokens)
    assert torch.equal(layout.from_sequence(sequence), tokens)
    start = torch.zeros(3, dtype=torch.long)
    nll = model.nll(sequence, start)
    assert nll.shape == (3, layout.positions, layout.subtokens) and bool((nll >= 0).all())
    # causal: the predictions of positions < 2 do not depend on the tokens from position 2 on
    changed = sequence.clone()
    changed[:, 2:] = 0
    assert torch.allclose(model.nll(changed, start)[:, :2], nll[:, :2], atol=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    nll.sum(-1).mean().backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters()) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    drawn = layout.from_sequence(model.sample(start, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0)))
    assert drawn.shape == tokens.shape
    assert all(0 <= int(drawn[..., k].min()) and int(drawn[..., k].max()) < v for k, v in enumerate(sizes))


def test_class_token_conditions_the_predictions(shards):
    from imagetok.probe.run import conditioning_classes

    torch.manual_seed(0)
    model = ProbeGPT(codebook_sizes=[16], positions=4, num_classes=3, width=16, depth=1, num_heads=2)
    assert model.null_class == 3 and model.start_token.num_embeddings == 4
    sequence = torch.randint(16, (1, 4, 1)).expand(4, 4, 1)
    nll = model.nll(sequence, torch.tensor([0, 1, 2, 3]))  # classes 0..2 and the null class
    assert not torch.allclose(nll[0], nll[1]) and not torch.allclose(nll[0], nll[3])
    labelled = TokenShardDataModule(train_dir=shards["labelled_train"], val_dir=shards["labelled_val"], batch_size=8)
    assert conditioning_classes(labelled, "auto") == 4 and conditioning_classes(labelled, "none") is None
    plain = TokenShardDataModule(train_dir=shards["train"], val_dir=shards["val"], batch_size=8)
    assert conditioning_classes(plain, "auto") is None
    with pytest.raises(ConfigValueError, match="has no class labels"):
        conditioning_classes(plain, "class")


# ---- the control: structure is found where it exists, and only there --------------------------------

def _probe(shards, train: str, val: str, run_dir: Path, *overrides: str):
    from imagetok.probe.run import probe

    cfg = compose_config("probe", [f"tokens={shards[train]}", f"val_tokens={shards[val]}", "probe_model=gpt_tiny",
                                   "~logger", "trainer.max_steps=150", "trainer.val_check_interval=150",
                                   "+trainer.enable_progress_bar=false", "optim.warmup_steps=10", "sample.num_samples=0",
                                   "fid.enabled=false", "cpu_threads=1", *overrides])
    return probe(cfg, run_dir).metrics


def test_the_probe_finds_left_neighbour_structure_and_not_in_shuffled_tokens(shards, tmp_path):
    real = _probe(shards, "train", "val", tmp_path / "real")["final"]
    control = _probe(shards, "shuffled_train", "shuffled_val", tmp_path / "shuffled")["final"]
    # the same code frequencies (4 bits of unigram entropy); the structure is worth about 3 bits
    assert abs(real["unigram_entropy_bits_per_position"] - control["unigram_entropy_bits_per_position"]) < 1e-9
    assert real["bits_per_position"] < control["bits_per_position"] - 1.0
    assert real["gap_bits_per_position"] > 1.0 and control["gap_bits_per_position"] < 0.3
    assert real["bits_per_pixel"] == pytest.approx(real["bits_per_position"] * 64 / 32**2)


# ---- labels from tokenize_dataset, and the command line end to end --------------------------------------

@pytest.fixture(scope="module")
def tokenized_folder(shards):
    """A 2-class ImageFolder tree tokenized by the tiny tokenizer (split=train and split=val)."""
    from imagetok.tokenize_dataset import tokenize

    root = shards["root"] / "folder"
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 4), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (40, 40, 3)) + np.array([180, 60, 60]) * (c == 0) + np.array([40, 160, 40]) * c
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    out = {}
    for split in ("train", "val"):
        cfg = compose_config("tokenize_dataset", [f"pretrained={shards['pretrained']}", f"out={root.parent / ('tok_' + split)}",
                                                  "data=imagefolder", f"data.root={root}", "data.image_size=32",
                                                  "data.num_workers=0", f"split={split}", "shard_size=3", "batch_size=4"])
        out[split] = tokenize(cfg)
    return out


def test_tokenize_dataset_writes_class_labels_of_an_image_folder(tokenized_folder):
    shards = TokenShards(tokenized_folder["train"])
    assert shards.index["num_classes"] == 2 and shards.index["label_names"] == ["cat", "dog"]
    assert shards.all_labels().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # sorted files: train/cat/*, then train/dog/*
    assert np.load(tokenized_folder["train"] / "labels-00001.npy").tolist() == [0, 1, 1]
    assert TokenShards(tokenized_folder["val"]).all_labels().tolist() == [0, 0, 1, 1]
    assert shards.all().shape == (8, 8, 8, 1)


def _run_cli(monkeypatch, args: list[str]) -> None:
    from imagetok.cli import probe as probe_cli

    monkeypatch.setattr(sys, "argv", ["probe.py", *args])
    probe_cli.main()


def test_the_command_line_writes_its_reports_with_gfid_and_resumes(tokenized_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    common = [f"tokens={tokenized_folder['train']}", f"val_tokens={tokenized_folder['val']}", "probe_model=gpt_tiny",
              "data.batch_size=4", "trainer.val_check_interval=2", "sample.num_samples=4", "sample.top_k=8",
              "fid.enabled=true", "fid.random_weights=true", "fid.feature_layer=64", "fid.num_samples=4",
              "cpu_threads=1", f"hydra.run.dir={run}"]
    _run_cli(monkeypatch, [*common, "trainer.max_steps=4"])
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("summary.md", "loss_curve.png", "samples.png", "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    final = metrics["final"]
    assert metrics["steps"] == 4 and metrics["conditioning"] == "class token over 2 classes"
    assert metrics["layout"]["kind"] == "grid" and metrics["layout"]["image_size"] == 32
    assert all(math.isfinite(final[k]) for k in ("nll_nats_per_position", "bits_per_position", "bits_per_subtoken",
                                                 "bits_per_pixel", "unigram_entropy_bits_per_position",
                                                 "gap_bits_per_position"))
    assert math.isfinite(metrics["gfid"]["gfid"]) and metrics["gfid"]["num_reference"] == 8
    assert "gFID" in (run / "summary.md").read_text()
    language = metrics["token_language"]  # of the training tokens: one entry per sub-codebook
    assert len(language) == 1 and language[0]["layout"] == "grid" and language[0]["images"] == 8
    assert 0 <= language[0]["conditional_entropy_left_up_bits"] < language[0]["raw_bits_per_token"]
    assert "sub-codebook 0 predictability" in (run / "summary.md").read_text()
    assert Image.open(run / "samples.png").size[0] > 4 * 32  # 4 samples, enlarged tiles
    # a killed or finished probe continues from its last checkpoint
    _run_cli(monkeypatch, [*common, "trainer.max_steps=6", "resume=last"])
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["steps"] == 6 and [row["step"] for row in resumed["validation"]] == [2, 4, 6]


def _error_of(monkeypatch, capsys, args: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["probe.py", *args])
    from imagetok.cli import probe as probe_cli

    with pytest.raises(SystemExit) as exited:
        probe_cli.main()
    out = capsys.readouterr()
    output = out.out + out.err
    assert exited.value.code == 2, output
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("case", ["missing dir", "empty dir", "no index.json", "other tokenizer", "bad option",
                                  "bad statistics cap", "tokenizer does not load"])
def test_bad_input_is_one_line_and_exit_code_2(shards, tmp_path, monkeypatch, capsys, case):
    train, val, extra = str(shards["train"]), str(shards["val"]), []
    if case == "missing dir":
        train, expected = str(tmp_path / "nope"), "does not exist"
    elif case == "empty dir":
        (tmp_path / "empty").mkdir()
        train, expected = str(tmp_path / "empty"), "has no index.json"
    elif case == "no index.json":
        shutil.copytree(shards["val"], tmp_path / "noindex")
        (tmp_path / "noindex" / INDEX_NAME).unlink()
        val, expected = str(tmp_path / "noindex"), "val_tokens="
    elif case == "other tokenizer":
        other = shutil.copytree(shards["val"], tmp_path / "other")
        index = json.loads((other / INDEX_NAME).read_text())
        (other / INDEX_NAME).write_text(json.dumps({**index, "tokenizer_sha256": "f" * 64}))
        val, expected = str(other), "tokenizer_sha256 differ"
    elif case == "bad option":
        extra, expected = ["probe.subtokens=foo"], "probe.subtokens='foo' is invalid"
    elif case == "bad statistics cap":
        extra, expected = ["token_language_max_images=-1"], "token_language_max_images=-1 is invalid"
    else:
        moved = shutil.copytree(shards["train"], tmp_path / "moved")
        index = json.loads((moved / INDEX_NAME).read_text())
        (moved / INDEX_NAME).write_text(json.dumps({**index, "pretrained": str(tmp_path / "gone")}))
        train, expected = str(moved), "the shards' tokenizer does not load"
    line = _error_of(monkeypatch, capsys, [f"tokens={train}", f"val_tokens={val}", f"hydra.run.dir={tmp_path / 'run'}",
                                           *extra])
    assert expected in line, line
