"""Data: sample photographs are split by photograph, crops are deterministic per index, ImageFolder
reads trees and names a bad file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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
    expected = torch.from_numpy(np.asarray(Image.open(tmp_path / "val" / "class_a" / "0.png"))).permute(2, 0, 1)
    # validation: centre square (40x40 of 40x48) resized to 32
    assert val[0].shape == (3, 32, 32) and expected.shape == (3, 40, 48)


def test_imagefolder_names_a_corrupt_file(tmp_path):
    _tree(tmp_path, n=1)
    bad = tmp_path / "train" / "class_a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=1, num_workers=0)
    files = dm.train_dataset()
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        [files[i] for i in range(len(files))]


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=1)
    with pytest.raises(ConfigValueError, match="holds images"):
        dm.train_dataset()
