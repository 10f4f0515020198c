"""``data.val_crop=adm``: guided-diffusion's evaluation crop (``center_crop_arr``, Dhariwal & Nichol 2021),
checked pixel for pixel against a reference written here from the published description, on odd sizes
and at the edges of its halving rule; the imagefolder datamodule serves it and evaluate records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagetok.data.imagefolder import ImageFolderDataModule
from imagetok.data.transforms import adm_center_crop, make_crop, to_model_range
from imagetok.errors import ConfigValueError


def published_center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The description of ``center_crop_arr``, step by step on a PIL image (``array``: uint8 ``[H, W, 3]``):
    halve with BOX while the shorter side is >= 2 * size; scale = size / shorter side; BICUBIC to
    (round(w * scale), round(h * scale)); the size x size square at top (H - size) // 2, left (W - size) // 2."""
    image = Image.fromarray(array)
    width, height = image.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), resample=Image.BOX)
    scale = size / min(width, height)
    width, height = round(width * scale), round(height * scale)
    image = image.resize((width, height), resample=Image.BICUBIC)
    top, left = (height - size) // 2, (width - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 ``[height, width, 3]``: smooth gradients plus noise, so every resampling step shows."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1), (xs + ys) % 256], axis=-1)
    return np.clip(smooth * 0.7 + rng.integers(0, 77, (height, width, 3)), 0, 255).astype(np.uint8)


def _ours(array: np.ndarray, size: int) -> np.ndarray:
    out = adm_center_crop(torch.from_numpy(array).permute(2, 0, 1).contiguous(), size)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, size, size)
    return out.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("width,height,size", [
    (517, 333, 256),    # odd, landscape, no halving
    (1001, 256, 256),   # shorter side exactly the size: only the (identity) resize and a wide crop
    (256, 256, 256),    # already the size
    (255, 700, 256),    # shorter side 1 below the size: upscaled
    (512, 800, 256),    # shorter side exactly 2x: halved once
    (511, 900, 256),    # just under 2x: not halved
    (1031, 1029, 256),  # halved twice (to 515x514, then 257x257), odd sides floored each time
    (37, 23, 16),       # small and odd
    (10, 13, 16),       # smaller than the size on both sides
])
def test_adm_crop_equals_the_published_description_exactly(width, height, size):
    array = _photo_like(width, height, seed=width * 7 + height)
    np.testing.assert_array_equal(_ours(array, size), published_center_crop(array, size))


def test_adm_crop_is_the_identity_at_the_size_and_box_means_at_exactly_twice_it():
    array = _photo_like(64, 64, seed=1)
    np.testing.assert_array_equal(_ours(array, 64), array)
    # exactly 2x: one BOX halving (the mean of each 2x2 block), then nothing more to do; within one grey
    # level, as PIL rounds to uint8 after its horizontal pass and again after its vertical one
    array = _photo_like(128, 128, seed=2)
    means = array.reshape(64, 2, 64, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(_ours(array, 64).astype(np.float64) - means).max() <= 1.0


def test_adm_crop_differs_from_the_center_crop():
    array = _photo_like(517, 333, seed=3)
    center = make_crop("center", 256)(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    assert not torch.equal(center, torch.from_numpy(_ours(array, 256)).permute(2, 0, 1))


def test_imagefolder_validates_on_adm_crops_when_asked_and_names_a_bad_val_crop(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.fromarray(_photo_like(75, 41, seed=4)).save(tmp_path / split / "0.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, num_workers=0, val_crop="adm")
    expected = torch.from_numpy(published_center_crop(_photo_like(75, 41, seed=4), 32)).permute(2, 0, 1)
    assert dm.val_crop_name == "adm" and torch.equal(dm.val_dataset()[0], to_model_range(expected))
    assert ImageFolderDataModule(root=str(tmp_path), image_size=32).val_crop_name == "center"  # the default
    with pytest.raises(ConfigValueError, match=r"val_crop='random_resized' is invalid: allowed values are one of \['center', 'adm'\]"):
        ImageFolderDataModule(root=str(tmp_path), image_size=32, val_crop="random_resized")
