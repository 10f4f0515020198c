"""Encode a dataset into token shards for downstream training:

    python -m imagetok.tokenize_dataset pretrained=<dir or hub id> data=<data config> out=<dir> [split=train]

Resumable: shards already on disk are skipped, each shard is written to a temporary file and renamed,
so an interrupted run leaves only complete shards. Split across processes: under ``torchrun`` (or
with ``RANK``/``WORLD_SIZE`` set) rank ``r`` writes shards ``r, r + world, ...``; no communication.
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
from imagetok.data.token_shards import INDEX_NAME, shard_name, token_dtype
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
    index = {"tokenizer_sha256": identity, "pretrained": str(cfg.pretrained), "codebook_sizes": tokenizer.codebook_sizes,
             "token_shape": list(tokenizer.token_shape(cfg.data.image_size)), "dtype": dtype.name, "num_images": total,
             "shard_size": cfg.shard_size, "split": cfg.split, "data": OmegaConf.to_container(cfg.data, resolve=True),
             "shards": [{"file": shard_name(k), "first": k * cfg.shard_size,
                         "count": min(cfg.shard_size, total - k * cfg.shard_size)} for k in range(num_shards)]}
    index_path = out / INDEX_NAME
    if index_path.is_file():
        previous = json.loads(index_path.read_text())
        for key in ("tokenizer_sha256", "num_images", "shard_size", "split", "data"):
            if previous.get(key) != index[key]:
                raise ConfigValueError("out", str(out), f"an empty directory or one written by the same tokenizer and "
                                       f"settings ({key} differs from its {INDEX_NAME})")
    elif rank == 0:
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, index_path)

    mine = [k for k in range(num_shards) if k % world == rank]
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
            tmp = out / (shard_name(k) + ".tmp")
            with open(tmp, "wb") as handle:  # np.save would append .npy to the temporary name
                np.save(handle, np.concatenate(tokens))
            os.replace(tmp, out / shard_name(k))
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="tokenize_dataset")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        tokenize(cfg)


if __name__ == "__main__":
    main()
