"""Encode a dataset into token shards for downstream training:

    python -m imagetok.tokenize_dataset pretrained=<dir or hub id> data=<data config> out=<dir> [split=train]

Resumable: shards already on disk are skipped, each shard is written to a temporary file and renamed,
so an interrupted run leaves only complete shards. Split across processes: under ``torchrun`` (or
with ``RANK``/``WORLD_SIZE`` set) rank ``r`` writes shards ``r, r + world, ...``; no communication.

Class labels: when the source has classes (``data=imagefolder`` with ``root/<split>/<class>/...``),
``labels-NNNNN.npy`` (int64 ``[n]``) is written next to each tokens shard and index.json records
``num_classes`` and ``label_names``; other sources write no labels (as before).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from imagetok.data.inference import require_indexed
from imagetok.data.token_shards import INDEX_NAME, label_shard_name, shard_name, token_dtype
from imagetok.errors import ConfigValueError, check, exit_on_user_error
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def tokenizer_identity(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's config and weights: shards from different tokenizers never mix."""
    digest = hashlib.sha256(json.dumps(tokenizer.config, sort_keys=True).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def source_labels(datamodule, split: str, total: int) -> tuple[np.ndarray, list[str]] | None:
    """Class ids (int64 ``[total]``) of the split's first ``total`` items, and the class names; None when
    the source has no classes. Only ImageFolder sources have them: item ``i`` of its split is file
    ``i % len(files)`` (its datasets cycle over the sorted file list), whose class is its first
    subdirectory (:func:`~imagetok.data.imagefolder.folder_classes`). The sample data has no classes,
    and webdataset sources (whose ``cls`` key would carry them) are streams, which this command refuses."""
    from imagetok.data.imagefolder import ImageFolderDataModule, folder_classes

    if not isinstance(datamodule, ImageFolderDataModule):
        return None
    classes = folder_classes(datamodule.root / split)
    if classes is None:
        return None
    per_file, names = classes
    per_file = np.asarray(per_file, dtype=np.int64)
    return per_file[np.arange(total) % len(per_file)], names


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:  # np.save would append .npy to the temporary name
        np.save(handle, array)
    os.replace(tmp, path)


def tokenize(cfg: DictConfig) -> Path:
    """Write the shards and ``index.json`` of ``cfg.split`` of ``cfg.data`` under ``cfg.out``."""
    from imagetok.training.run import instantiate_part

    _ = cfg.pretrained, cfg.out  # a missing required value fails here, in one line, before any work
    check(cfg.split in ("train", "val"), "split", cfg.split, "'train' or 'val'")
    check(isinstance(cfg.shard_size, int) and cfg.shard_size >= 1, "shard_size", cfg.shard_size, "an integer >= 1")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = Tokenizer.from_pretrained(cfg.pretrained)
    datamodule = instantiate_part(cfg.data, "data")
    dataset = datamodule.train_dataset() if cfg.split == "train" else datamodule.val_dataset()
    require_indexed(dataset, cfg.data._target_, "shard k holds images [k * shard_size, (k + 1) * shard_size) of the "
                    "split, so that an interrupted run resumes by writing only the missing shards")
    total = len(dataset) if cfg.num_images is None else min(int(cfg.num_images), len(dataset))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = tokenizer_identity(tokenizer)
    dtype = token_dtype(tokenizer.codebook_sizes)
    num_shards = -(-total // cfg.shard_size)
    # A local tokenizer is recorded by its absolute path, so readers of the shards (the AR probe) find it from anywhere.
    local = Path(str(cfg.pretrained)).expanduser()
    pretrained = str(local.resolve()) if local.is_dir() else str(cfg.pretrained)
    index = {"tokenizer_sha256": identity, "pretrained": pretrained, "codebook_sizes": tokenizer.codebook_sizes,
             "token_shape": list(tokenizer.token_shape(cfg.data.image_size)), "dtype": dtype.name, "num_images": total,
             "shard_size": cfg.shard_size, "split": cfg.split, "data": OmegaConf.to_container(cfg.data, resolve=True),
             "shards": [{"file": shard_name(k), "first": k * cfg.shard_size,
                         "count": min(cfg.shard_size, total - k * cfg.shard_size)} for k in range(num_shards)]}
    scales = getattr(tokenizer.quantizer, "scales", None)
    if scales is not None and not tokenizer.is_sequence:  # multi-scale (VAR): [sum s^2, 1], coarse to fine
        index["scales"] = list(scales)
    labels = source_labels(datamodule, cfg.split, total)
    if labels is not None:
        index["num_classes"], index["label_names"] = len(labels[1]), labels[1]
        log.info("class labels: %d classes (the first subdirectory of each image), written as labels-NNNNN.npy",
                 len(labels[1]))
    index_path = out / INDEX_NAME
    previous = json.loads(index_path.read_text()) if index_path.is_file() else None
    if previous is not None:
        for key in ("tokenizer_sha256", "num_images", "shard_size", "split", "data"):
            if previous.get(key) != index[key]:
                raise ConfigValueError("out", str(out), f"an empty directory or one written by the same tokenizer and "
                                       f"settings ({key} differs from its {INDEX_NAME})")
    if rank == 0 and previous != index:  # new, or written before labels/scales were recorded
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, index_path)

    mine = [k for k in range(num_shards) if k % world == rank]
    if labels is not None:  # cheap, no encoding: also fills in labels for shards written before labels existed
        for k in mine:
            if not (out / label_shard_name(k)).is_file():
                first, count = index["shards"][k]["first"], index["shards"][k]["count"]
                _write_npy(out / label_shard_name(k), labels[0][first : first + count])
    todo = [k for k in mine if not (out / shard_name(k)).is_file()]
    log.info("rank %d/%d: %d of its %d shards to write (%d skipped as already complete), %d images, dtype %s",
             rank, world, len(todo), len(mine), len(mine) - len(todo), total, dtype.name)
    to_write = sum(index["shards"][k]["count"] for k in todo)
    log.info("%d images to tokenize on this rank (%s); the time estimate follows the first batch", to_write,
             "num_images=%d" % total if cfg.num_images is not None else
             f"the whole {cfg.split} split of {len(dataset)} images; num_images=N tokenizes the first N")
    started = None
    with torch.no_grad(), tqdm(total=sum(index["shards"][k]["count"] for k in todo), unit="img", desc="tokenize",
                               disable=rank != 0) as bar:
        for k in todo:
            first, count = index["shards"][k]["first"], index["shards"][k]["count"]
            subset = torch.utils.data.Subset(dataset, range(first, first + count))
            loader = torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, num_workers=datamodule.num_workers)
            tokens = []
            for images in loader:
                tick = time.perf_counter()
                tokens.append(tokenizer.encode(images).cpu().numpy().astype(dtype))
                bar.update(images.shape[0])
                if started is None:  # one batch timed: say up front how long the whole job will take
                    started = time.perf_counter() - tick
                    log.info("estimated %.1f minutes for %d images (%.0f images/s on the first batch)",
                             started * to_write / images.shape[0] / 60, to_write, images.shape[0] / max(started, 1e-9))
            _write_npy(out / shard_name(k), np.concatenate(tokens))
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="tokenize_dataset")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        tokenize(cfg)


if __name__ == "__main__":
    main()
