"""Webdataset shards: data/make_shards.py writes them (limits, labels, sizes, unreadable inputs), and
WebDataModule reads them (brace and pipe: URLs, rank and worker splits, fixed epoch length, seeded
order, crops, corrupt samples), alone, in training, and under 2-process DDP.

Most images are solid colours with the sample's number in the red channel (PNG, lossless), so
a crop of any size still says which image it came from."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import imagetok.data.webdataset as webdataset_module
from conftest import ROOT
from imagetok.data.corrupt import CorruptDataError, CorruptSampleGuard
from imagetok.data.imagefolder import ImageFolderDataModule, read_image
from imagetok.data.transforms import adm_center_crop, center_square, make_crop, to_model_range
from imagetok.data.webdataset import ShardImages, WebDataModule, expand_shard_urls
from imagetok.errors import ConfigValueError
from test_train_variants import TINY

_spec = importlib.util.spec_from_file_location("make_shards", ROOT / "data" / "make_shards.py")
make_shards_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards_script)
make_shards, InputError = make_shards_script.make_shards, make_shards_script.InputError

CLASSES = {"cat": 7, "dog": 5}  # 12 images, numbered 0..11 in (class, file name) order
N = sum(CLASSES.values())


def _solid(number: int, size=(24, 32)) -> Image.Image:
    return Image.new("RGB", size[::-1], (4 * number, 255 - 4 * number, 128))


def _ids(images: torch.Tensor) -> list[int]:
    """The numbers of solid images ``[B, 3, S, S]`` (or one ``[3, S, S]``) in [-1, 1]."""
    red = images.reshape(-1, *images.shape[-3:])[:, 0, 0, 0]
    return (((red + 1) * 127.5).round().long() // 4).tolist()


def _solid_tree(root):
    number = 0
    for name, count in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            _solid(number).save(root / name / f"{i:02d}.png")
            number += 1
    return root


def _noise(path, size, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards of 2 solid images each (shard k holds images 2k and 2k+1); returns the brace pattern."""
    root = tmp_path_factory.mktemp("solid")
    index = make_shards(_solid_tree(root / "tree"), root / "shards", shard_size=2, progress=False)
    assert index["urls"] == f"{root / 'shards'}/shard-{{000000..000005}}.tar"
    return index["urls"]


def _module(urls, **kw) -> WebDataModule:
    args = dict(urls=urls, val_urls=urls, image_size=16, batch_size=4, num_workers=0, epoch_length=8,
                shuffle_buffer=0, resampled=False, crop="center")
    return WebDataModule(**args | kw)


def _one_pass(dataset: ShardImages, num_workers: int = 0) -> list[int]:
    dataset.repeat, dataset.batch_size = 1, None
    return [i for x in DataLoader(dataset, batch_size=None, num_workers=num_workers) for i in _ids(x)]


def _members(shard) -> dict[str, dict[str, bytes]]:
    """A tar shard read with tarfile alone: ``{key: {extension: bytes}}``."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# ---------------------------------------------------------------- data/make_shards.py

def test_make_shards_limits_shards_by_count_and_bytes_and_keeps_labels_and_sizes(tmp_path):
    tree = tmp_path / "tree"
    sizes = {}
    for label, name in enumerate(["cat", "dog"]):
        (tree / name).mkdir(parents=True)
        for i in range(5):
            size = (20 + 3 * i + label, 30 + 2 * i)
            _noise(tree / name / f"{i}.png", size, seed=10 * label + i)
            sizes[f"{name}/{i}.png"] = size

    index = make_shards(tree, tmp_path / "by_count", shard_size=3, progress=False)
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 1] and index["samples"] == 10
    assert index["classes"] == ["cat", "dog"] and index["skipped"] == []
    assert json.loads((tmp_path / "by_count" / "index.json").read_text()) == index
    seen = 0
    for shard in index["shards"]:
        for key, sample in _members(tmp_path / "by_count" / shard["name"]).items():
            meta = json.loads(sample["json"])
            name, file = meta["path"].split("/")
            assert int(sample["cls"]) == meta["label"] == ["cat", "dog"].index(name) and meta["label_name"] == name
            assert (meta["height"], meta["width"]) == sizes[meta["path"]]  # the original size
            assert sample["png"] == (tree / name / file).read_bytes()  # the original bytes, not re-encoded
            seen += 1
    assert seen == 10

    max_bytes = 30_000  # about four of these samples (each ~4.6 KB with tar headers) per shard
    index = make_shards(tree, tmp_path / "by_bytes", shard_size=100, max_bytes=max_bytes, progress=False)
    files = sorted((tmp_path / "by_bytes").glob("*.tar"))
    assert [f.name for f in files] == [s["name"] for s in index["shards"]] and index["samples"] == 10
    assert all(f.stat().st_size == s["bytes"] <= max_bytes for f, s in zip(files, index["shards"]))
    assert len(files) >= 3 and max(s["samples"] for s in index["shards"]) >= 2  # packed, yet within the limit


def test_make_shards_reencodes_and_shrinks_to_a_max_side(tmp_path):
    (tree := tmp_path / "tree" / "a").mkdir(parents=True)
    _noise(tree / "wide.png", (40, 60))
    index = make_shards(tmp_path / "tree", tmp_path / "small", max_side=20, quality=90, progress=False)
    [sample] = _members(tmp_path / "small" / index["shards"][0]["name"]).values()
    assert set(sample) == {"jpg", "cls", "json"}
    assert Image.open(io.BytesIO(sample["jpg"])).size == (20, 13)  # longer side 20, aspect kept
    assert json.loads(sample["json"])["width"] == 60 and json.loads(sample["json"])["height"] == 40

    index = make_shards(tmp_path / "tree", tmp_path / "jpeg", reencode=True, progress=False)
    [sample] = _members(tmp_path / "jpeg" / index["shards"][0]["name"]).values()
    assert Image.open(io.BytesIO(sample["jpg"])).size == (60, 40)  # re-encoded, not resized


def test_make_shards_reads_a_list_and_lists_unreadable_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    _solid(1).save(tmp_path / "imgs" / "one.png")
    _solid(2).save(tmp_path / "two.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="JPEG")
    (tmp_path / "imgs" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    listing = tmp_path / "files.txt"
    lines = ["imgs/one.png", "", "imgs/broken.jpg", str(tmp_path / "two.png"), "imgs/missing.png", "imgs/truncated.jpg"]
    listing.write_text("\n".join(lines) + "\n")

    index = make_shards(listing, tmp_path / "out", progress=False)
    assert index["samples"] == 2 and index["classes"] == []
    assert [os.path.basename(s["path"]) for s in index["skipped"]] == ["broken.jpg", "missing.png", "truncated.jpg"]
    assert "truncated" in index["skipped"][2]["error"].lower()
    samples = _members(tmp_path / "out" / index["shards"][0]["name"])
    # paths relative to the list's folder
    assert [json.loads(s["json"])["path"] for s in samples.values()] == ["imgs/one.png", "two.png"]
    assert {int(s["cls"]) for s in samples.values()} == {-1}  # a list carries no labels


def test_make_shards_refuses_missing_empty_or_unreadable_input(tmp_path, capsys):
    with pytest.raises(InputError, match="neither a directory"):
        make_shards(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no images"):
        make_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(InputError, match="names no image files"):
        make_shards(tmp_path / "list.txt", tmp_path / "out")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="none of the 1 images"):
        make_shards(tmp_path / "bad", tmp_path / "out", progress=False)
    assert make_shards_script.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "error: input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_shards_script.main([str(tmp_path / "empty"), str(tmp_path / "out"), "--shard-size", "0"])


def test_make_shards_cli_prints_progress_skipped_files_and_the_urls(tmp_path):
    tree = _solid_tree(tmp_path / "tree")
    (tree / "dog" / "zz_broken.png").write_bytes(b"junk")
    command = [sys.executable, "data/make_shards.py", str(tree), str(tmp_path / "out"), "--shard-size", "5"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pattern = f"{tmp_path / 'out'}/shard-{{000000..000002}}.tar"
    assert f"wrote {N} images into 3 shards: {pattern}" in proc.stdout
    assert "skipped 1 unreadable images:" in proc.stdout and "zz_broken.png" in proc.stdout
    assert f"{N + 1}/{N + 1}" in proc.stderr and "skipped=1" in proc.stderr  # tqdm's progress line
    assert len(expand_shard_urls(pattern, "urls")) == 3


# ---------------------------------------------------------------- WebDataModule

def test_brace_patterns_expand_and_missing_shards_are_named(shards):
    files = expand_shard_urls(shards, "urls")
    assert len(files) == 6 and files[0].endswith("shard-000000.tar") and files[5].endswith("shard-000005.tar")
    assert expand_shard_urls(f"{files[0]}::{files[1]}", "urls") == files[:2]
    assert expand_shard_urls([shards, files[0]], "urls") == [*files, files[0]]
    too_many = shards.replace("000005", "000007")
    with pytest.raises(ConfigValueError, match=r"2 of 8 missing, e.g. .*shard-000006.tar") as err:
        _module(too_many)
    assert err.value.key == "urls"
    with pytest.raises(ConfigValueError) as err:
        _module(shards, val_urls=too_many)
    assert err.value.key == "val_urls"
    # pipe: commands are expanded and left to the reader
    assert expand_shard_urls("pipe:cat /nowhere/x-{0..2}.tar", "urls")[2] == "pipe:cat /nowhere/x-2.tar"


def test_pipe_urls_read_the_same_images_as_paths(shards, caplog):
    directory = os.path.dirname(shards)
    piped = _module(f"pipe:cat {directory}/shard-{{000000..000005}}.tar")
    by_path = _module(shards)
    assert [_ids(b) for b in piped.val_dataloader()] == [_ids(b) for b in by_path.val_dataloader()]
    assert sorted(i for b in piped.val_dataloader() for i in _ids(b)) == list(range(N))
    # a command that fails is a shard skipped, named, and counted like a corrupt sample
    urls = ["pipe:cat /nowhere/shard-000000.tar 2>/dev/null", f"{directory}/shard-000001.tar"]
    dataset = ShardImages(urls, crop=make_crop("center", 16), rank=0, world=1, guard=CorruptSampleGuard(1.0, 1))
    with caplog.at_level(logging.WARNING, logger="imagetok.data.corrupt"):
        assert [i for x in dataset for i in _ids(x)] == [2, 3]
    assert "skipped corrupt sample shard pipe:cat /nowhere/shard-000000.tar" in caplog.text


@pytest.mark.parametrize("num_workers, resampled", [(0, False), (2, False), (2, True)])
def test_every_epoch_has_the_same_number_of_full_batches_in_model_range(shards, num_workers, resampled):
    dm = _module(shards, num_workers=num_workers, resampled=resampled, epoch_length=10, crop="random_resized",
                 shuffle_buffer=4)
    loader = dm.train_dataloader()
    assert len(loader) == 10 // 4
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(itertools.islice(loader, 5))
        assert len(batches) == 2  # epoch_length // batch_size, whatever the shards hold
        for batch in batches:
            assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
            assert -1 <= batch.min() and batch.max() <= 1
            assert set(_ids(batch)) <= set(range(N))


def test_ranks_with_unequal_shards_get_equal_batches(tmp_path, monkeypatch):
    # rank 0 reads a shard of 7 images, rank 1 one of 1: each still runs epoch_length // batch_size full batches
    index = make_shards(_solid_tree(tmp_path / "tree"), tmp_path / "shards", shard_size=7, progress=False)
    assert [s["samples"] for s in index["shards"]] == [7, 5]
    small = make_shards(tmp_path / "tree" / "dog", tmp_path / "one", shard_size=1, progress=False)
    urls = [f"{tmp_path}/shards/shard-000000.tar", f"{tmp_path}/one/{small['shards'][0]['name']}"]
    counts = []
    for rank in (0, 1):
        monkeypatch.setattr(webdataset_module, "distributed_rank_and_world", lambda trainer=None, r=rank: (r, 2))
        batches = list(_module(urls, epoch_length=12).train_dataloader())
        counts.append([tuple(b.shape) for b in batches])
        assert set(i for b in batches for i in _ids(b)) == ({7} if rank else set(range(7)))
    assert counts[0] == counts[1] == [(4, 3, 16, 16)] * 3


def test_two_ranks_read_disjoint_shards_that_cover_every_image_once(shards, monkeypatch):
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(webdataset_module, "distributed_rank_and_world", lambda trainer=None, r=rank: (r, 2))
        dm = _module(shards, shuffle_buffer=4, num_workers=1)
        seen[rank] = sorted(_one_pass(dm.train_dataset()))
        # validation: every image once over the ranks as well, in batches of val_batch_size
        assert sorted(i for b in dm.val_dataloader() for i in _ids(b)) == seen[rank]
    # rank r reads shards r, r + 2, r + 4; shard k holds images 2k and 2k + 1
    assert seen[0] == [0, 1, 4, 5, 8, 9] and seen[1] == [2, 3, 6, 7, 10, 11]


def test_each_worker_reads_its_own_shards(shards):
    dm = _module(shards, num_workers=2)
    assert sorted(_one_pass(dm.train_dataset(), num_workers=2)) == list(range(N))  # each image once
    unsplit = dm.train_dataset()
    unsplit.split_by_worker = False
    assert sorted(_one_pass(unsplit, num_workers=2)) == sorted(list(range(N)) * 2)  # what the split prevents


def test_preflight_refuses_fewer_shards_than_ranks_times_workers(shards, monkeypatch):
    monkeypatch.setattr(webdataset_module, "distributed_rank_and_world", lambda trainer=None: (0, 2))
    with pytest.raises(ConfigValueError, match=r"6 shards.*at least world_size x num_workers = 2 x 4 = 8 shards"):
        _module(shards, num_workers=4).train_dataloader()
    _module(shards, num_workers=3).train_dataset()  # 2 x 3 = 6: one shard each
    _module(shards, num_workers=4, resampled=True).train_dataset()  # resampling needs no split
    with pytest.raises(ConfigValueError, match=r"data.val_urls.*at least world_size = 2"):
        _module(shards, val_urls=shards.replace("{000000..000005}", "000000")).val_dataloader()


@pytest.mark.parametrize("resampled", [False, True])
def test_order_is_a_function_of_seed_and_epoch(shards, resampled):
    def order(seed, epoch):
        loader = _module(shards, seed=seed, shuffle_buffer=6, resampled=resampled, epoch_length=12).train_dataloader()
        loader.sampler.set_epoch(epoch)  # where Lightning's _set_sampler_epoch finds it
        return [i for b in loader for i in _ids(b)]

    first = order(0, 0)
    assert len(first) == 12 and order(0, 0) == first
    assert order(0, 1) != first and order(1, 0) != first
    if not resampled:
        assert sorted(first) == list(range(N))  # one pass over the shards, shuffled


def test_a_restored_loader_continues_the_epoch_where_the_checkpoint_was(shards):
    def loader():
        loader = _module(shards, shuffle_buffer=6, resampled=True, epoch_length=16, num_workers=2).train_dataloader()
        loader.sampler.set_epoch(3)
        return loader

    straight = loader()
    batches = []
    for batch in straight:
        batches.append(batch)
        if len(batches) == 3:
            state = straight.state_dict()  # what a checkpoint after 3 steps holds
    assert state == {"batches_served": 3, "batch_size": 4} and straight.state_dict()["batches_served"] == 4
    restored = loader()
    restored.load_state_dict(state)
    assert [_ids(b) for b in restored] == [_ids(batches[3])]  # the rest of epoch 3, not its start
    assert len(list(restored)) == 4  # and the next pass is whole again
    restored.load_state_dict({"batches_served": 6, "batch_size": 2})  # batch size 2 -> 4: same images left out
    assert [_ids(b) for b in restored] == [_ids(batches[3])]


def test_center_and_random_resized_crops_match_the_imagefolder_ones(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "tree" / split / "a").mkdir(parents=True)
        for i in range(4):
            _noise(tmp_path / "tree" / split / "a" / f"{i}.png", (24, 32), seed=i)
    tree = tmp_path / "tree" / "train" / "a"
    urls = make_shards(tmp_path / "tree" / "train", tmp_path / "shards", progress=False)["urls"]
    expected = torch.stack([to_model_range(center_square(read_image(tree / f"{i}.png"), 16)) for i in range(4)])
    folder = ImageFolderDataModule(root=str(tmp_path / "tree"), image_size=16, batch_size=4, crop="center")
    assert torch.equal(torch.stack([folder.train_dataset()[i] for i in range(4)]), expected)  # the same crops

    center = _module(urls, crop="center", epoch_length=4).train_dataloader()
    assert torch.equal(next(iter(center)), expected)  # the largest centred square, resized
    center.sampler.set_epoch(1)
    assert torch.equal(next(iter(center)), expected)  # ... every epoch

    crops = _module(urls, crop="random_resized", scale=(0.3, 0.6), epoch_length=4).train_dataloader()
    first = next(iter(crops))
    crops.sampler.set_epoch(1)
    second = next(iter(crops))
    assert first.shape == expected.shape and -1 <= first.min() and first.max() <= 1
    assert not torch.equal(first, expected) and not torch.equal(first, second)  # new crops each epoch
    validation = _module(urls, crop="random_resized", epoch_length=4).val_dataloader()
    assert torch.equal(next(iter(validation)), expected)  # validation is centre crops, whatever the training crop
    # data.val_crop=adm: guided-diffusion's crop, as the imagefolder datamodule cuts it
    adm = torch.stack([to_model_range(adm_center_crop(read_image(tree / f"{i}.png"), 16)) for i in range(4)])
    validation = _module(urls, val_crop="adm", epoch_length=4)
    assert validation.val_crop_name == "adm" and torch.equal(next(iter(validation.val_dataloader())), adm)
    assert not torch.equal(adm, expected)


def _shard_with_corrupt_images(path) -> None:
    """8 samples: solid PNGs 0..7, except 2 (not an image) and 5 (a JPEG cut in half)."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for number in range(8):
            buffer = io.BytesIO()
            _solid(number).save(buffer, format="PNG" if number != 5 else "JPEG")
            data = {2: b"\xff\xd8\xff\xe0 not a jpeg", 5: buffer.getvalue()[: len(buffer.getvalue()) // 2]}
            add(f"{number:08d}.{'png' if number not in (2, 5) else 'jpg'}", data.get(number, buffer.getvalue()))
            add(f"{number:08d}.cls", b"0")


def test_corrupt_samples_are_skipped_and_named_until_too_many(tmp_path, caplog):
    shard = str(tmp_path / "bad-000000.tar")
    _shard_with_corrupt_images(shard)

    def dataset(max_fraction):
        return ShardImages([shard], crop=make_crop("center", 16), rank=0, world=1,
                           guard=CorruptSampleGuard(max_fraction, min_seen=8))

    with caplog.at_level(logging.WARNING, logger="imagetok.data.corrupt"):
        assert [i for x in dataset(0.25) for i in _ids(x)] == [0, 1, 3, 4, 6, 7]
    assert f"skipped corrupt sample 00000002 in {shard}" in caplog.text
    assert f"skipped corrupt sample 00000005 in {shard}" in caplog.text and "truncated" in caplog.text.lower()

    # 2 bad of 8 is above 20%: the run stops at the second, naming both
    with pytest.raises(CorruptDataError, match=r"2 of 6 samples .*above data.max_corrupt_fraction=0.2.*"
                                               r"00000002 in .*00000005 in "):
        list(dataset(0.2))
    # ... also from a DataLoader worker, through the datamodule's config keys
    dm = _module(shard, num_workers=1, max_corrupt_fraction=0.2, corrupt_min_seen=8, epoch_length=8)
    with pytest.raises(CorruptDataError, match="00000005"):
        list(dm.train_dataloader())


def test_training_shards_without_a_readable_image_stop_the_run(tmp_path):
    shard = str(tmp_path / "bad-000000.tar")
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("00000000.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    # every sample tolerated as corrupt: instead of an endless wait for a batch, a clear error
    with pytest.raises(RuntimeError, match="a pass over its shards gave no readable image"):
        list(_module(shard, max_corrupt_fraction=1.0).train_dataloader())


# ---------------------------------------------------------------- training

def test_training_from_the_cli_config_on_shards(compose_config, shards, tmp_path, caplog):
    from imagetok.training.run import train

    val_urls = shards.replace("000005", "000001")  # 4 images: one validation batch
    cfg = compose_config(["data=webdataset", f"data.urls='{shards}'", f"data.val_urls='{val_urls}'",
                          "data.num_workers=0", "data.epoch_length=8", "data.shuffle_buffer=4", *TINY,
                          "trainer.max_steps=3", "trainer.val_check_interval=2", "checkpoint.every_n_steps=3",
                          "loss.disc_start=100"])
    with caplog.at_level(logging.INFO, logger="imagetok.data.webdataset"):
        run = train(cfg, tmp_path / "run")
    assert run.trainer.global_step == 3 and math.isfinite(run.summary["last_validation"]["val/psnr"])
    # 8 // 4 = 2 batches per epoch, and Lightning told the shards about each epoch
    assert run.trainer.num_training_batches == 2
    assert "epoch 0 on rank 0 of 1" in caplog.text and "epoch 1 on rank 0 of 1" in caplog.text
    assert run.trainer.train_dataloader.sampler.epoch == 1


def test_two_process_training_on_shards_gives_every_rank_equal_batches(shards, tmp_path):
    # rank 0 reads 4 images, rank 1 two (resampled=false): equal batches regardless, or DDP would hang
    directory = os.path.dirname(shards)
    urls = f"[{directory}/shard-000000.tar,{directory}/shard-000002.tar,{directory}/shard-000001.tar]"
    run_dir = tmp_path / "run"
    overrides = ["data=webdataset", f"data.urls={urls}", f"data.val_urls={urls}", "data.resampled=false",
                 "data.num_workers=1", "data.epoch_length=8", "data.shuffle_buffer=0", *TINY, "trainer.devices=2",
                 "trainer.max_steps=4", "trainer.val_check_interval=2", "checkpoint.every_n_steps=4",
                 "loss.disc_start=100", f"hydra.run.dir={run_dir}", "hydra.verbose=imagetok.data.webdataset"]
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, IMAGETOK_OFFLINE="1"), timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["generator_steps"] == 4 and summary["ranks_in_sync"] is True
    for epoch in (0, 1):  # Lightning called set_epoch on both ranks, for both epochs; INFO on rank 0 alone
        assert f"[INFO] - training shards: epoch {epoch} on rank 0 of 2" in output
        assert f"[DEBUG] - training shards: epoch {epoch} on rank 1 of 2" in output
        assert f"[INFO] - training shards: epoch {epoch} on rank 1" not in output
