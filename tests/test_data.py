"""Data: sample photographs are split by photograph, crops are deterministic per index, ImageFolder
reads trees and names a bad file."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from imagetok.data.corrupt import CorruptDataError
from imagetok.data.imagefolder import ImageFolderDataModule, ImageLoadError
from imagetok.data.sample import SampleDataModule
from imagetok.errors import ConfigValueError


def test_sample_data_is_real_photographs_in_model_range():
    dm = SampleDataModule(image_size=32, batch_size=4, train_samples=50, val_samples=6)
    train, val = dm.train_dataset(), dm.val_dataset()
    x = train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(train[3], x)  # a sample is a function of its index: reproducible, resumable
    assert not torch.equal(train[4], x)
    assert x.std() > 0.01  # not a constant image
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (4, 3, 32, 32) and len(val) == 6


def test_train_and_validation_photographs_must_differ():
    with pytest.raises(ConfigValueError, match="val_photos"):
        SampleDataModule(train_photos=["astronaut", "coffee"], val_photos=["coffee"])
    with pytest.raises(ConfigValueError, match="train_photos"):
        SampleDataModule(train_photos=["not_a_photo"])


def _tree(root, n=3, size=(40, 48)):
    for split in ("train", "val"):
        (root / split / "class_a").mkdir(parents=True)
        for i in range(n):
            array = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / split / "class_a" / f"{i}.png")


def test_imagefolder_reads_a_tree(tmp_path):
    _tree(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    train, val = dm.train_dataset(), dm.val_dataset()
    assert len(train) == 3 and train[0].shape == (3, 32, 32)
    # validation: the centre square (40x40 of 40 high x 48 wide) resized to 32, as PIL's antialiased bilinear does
    image = Image.open(tmp_path / "val" / "class_a" / "0.png").convert("RGB")
    expected = np.asarray(image.crop((4, 0, 44, 40)).resize((32, 32), Image.BILINEAR)).astype(np.float32)
    got = (val[0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(got - expected).max() <= 1.01  # torch's antialiased resize matches PIL to one grey level


def test_training_crops_change_every_epoch_but_are_reproducible(tmp_path):
    _tree(tmp_path, size=(64, 80))
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=3, num_workers=0, scale=(0.3, 0.9))
    loader = dm.train_dataloader()

    def epoch(number):
        loader.batch_sampler.sampler.set_epoch(number)  # where Lightning's _set_sampler_epoch finds it
        return next(iter(loader))

    first, second = epoch(0), epoch(1)
    assert not torch.equal(first, second)  # new crops (and order) each epoch: real augmentation
    assert torch.equal(epoch(0), first) and torch.equal(epoch(1), second)  # a function of (seed, epoch)
    # every epoch still visits every file once: index modulo the file count
    order = list(iter(loader.batch_sampler.sampler))
    assert sorted(i % 3 for i in order) == [0, 1, 2]


def test_imagefolder_names_a_corrupt_file(tmp_path):
    _tree(tmp_path, n=1)
    bad = tmp_path / "train" / "class_a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    # with no tolerance the first unreadable file stops the run, naming it
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=1, num_workers=0, max_corrupt_fraction=0.0)
    files = dm.train_dataset()
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        [files[i] for i in range(len(files))]


def test_imagefolder_skips_corrupt_files_until_too_many(tmp_path, caplog):
    _tree(tmp_path, n=3)
    # sorts between 0.png and 1.png
    (tmp_path / "train" / "class_a" / "0_broken.png").write_bytes(b"\x89PNG not really")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=2, num_workers=0, crop="center",
                               max_corrupt_fraction=0.5, corrupt_min_seen=4)
    files = dm.train_dataset()
    assert len(files) == 4
    with caplog.at_level(logging.WARNING, logger="imagetok.data.corrupt"):
        images = [files[i] for i in (0, 1, 2, 3, 1)]
    # the broken file is replaced by the next readable one, so batches keep their size
    assert torch.equal(images[1], images[2]) and not torch.equal(images[0], images[1])
    assert caplog.text.count("skipped corrupt sample") == 1 and "0_broken.png" in caplog.text  # logged once
    assert next(iter(dm.train_dataloader())).shape == (2, 3, 16, 16)

    (tmp_path / "train" / "class_a" / "2_broken.png").write_bytes(b"")
    strict = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=2, num_workers=0,
                                   max_corrupt_fraction=0.25, corrupt_min_seen=4).train_dataset()
    with pytest.raises(CorruptDataError, match=r"2 of \d+ samples .*0_broken.png, .*2_broken.png"):
        [strict[i] for i in range(len(strict))]


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=1)
    with pytest.raises(ConfigValueError, match="holds images"):
        dm.train_dataset()


def test_train_loader_resumes_mid_epoch_with_another_batch_size_and_needs_crop_datasets(caplog):
    from imagetok.data.datamodule import ImageDataModule

    def loader(batch_size):
        return SampleDataModule(image_size=16, batch_size=batch_size, train_samples=24, val_samples=2).train_dataloader()

    straight = list(loader(4))  # 6 batches of 4
    restored = loader(4)
    with caplog.at_level(logging.WARNING, logger="imagetok.data.datamodule"):
        restored.load_state_dict({"batches_served": 4, "batch_size": 2})  # 8 images served in batches of 2
    assert "leaving out 2 batches" in caplog.text
    rest = list(restored)
    assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(rest, straight[2:]))
    restored.load_state_dict({"batches_served": 6, "batch_size": 4})  # a finished pass: the next one is whole
    assert len(list(restored)) == 6

    class Plain(ImageDataModule):  # a dataset whose order could not resume exactly
        def train_dataset(self):
            return torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8))

        def val_dataset(self):
            return self.train_dataset()

    with pytest.raises(TypeError, match="CropDataset"):
        Plain(image_size=8, batch_size=2).train_dataloader()
