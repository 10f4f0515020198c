"""Data loading: decode + crop throughput of the ImageFolder and webdataset datamodules on the same
JPEGs, in images per second per worker, one JSON line per case.

    python benchmarks/data.py [--images 512] [--image-size 256] [--batch-size 8] [--workers 0 1 2] [--repeats 3]

The script writes ``--images`` JPEGs of 400x300 (quality 90, windows of the scikit-image sample
photographs, so they compress like photographs) into a temporary ImageFolder tree and packs the same
files into webdataset shards of 64 images with ``data/make_shards.py`` (original bytes). Each case
runs one warm-up epoch and ``--repeats`` timed epochs of a datamodule's ``train_dataloader``
(``random_resized`` crops, one epoch = ``--images`` images), each timed in steady state: from the
batch by which every worker has delivered its first, to the last.

- ``images_per_s`` (and ``_per_worker``): wall-clock rate of the best timed epoch.
- ``images_per_cpu_s``: images per CPU second of the decoding processes (the workers, or the main
  process with ``num_workers=0``) over all timed epochs: what one worker core does, and the figure
  to read on a machine that other jobs share.
- ``first_batch_s``: the wait for an epoch's first batch (webdataset starts its workers anew every
  epoch and fills its shuffle buffer; ImageFolder's workers persist).

Each case runs in a fresh subprocess with one torch thread (as DataLoader workers have).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, QUALITY, SHARD_SIZE = 400, 300, 90, 64


def write_images(root: Path, count: int) -> None:
    """``count`` JPEGs of WIDTH x HEIGHT in ``root/train/<photo>/`` (and 8 in ``root/val/``)."""
    import numpy as np
    import torch
    from PIL import Image

    from imagetok.data.sample import TRAIN_PHOTOS, VAL_PHOTOS, load_photo

    rng = np.random.default_rng(0)
    photos = {name: load_photo(name) for name in (*TRAIN_PHOTOS, *VAL_PHOTOS)}
    for split, n in (("train", count), ("val", 8)):
        for i in range(n):
            name = list(photos)[i % len(photos)]
            photo = photos[name]
            scale = max(HEIGHT / photo.shape[1], WIDTH / photo.shape[2], 1.0)  # small photos are enlarged first
            if scale > 1:
                size = (int(photo.shape[1] * scale) + 1, int(photo.shape[2] * scale) + 1)
                photo = torch.nn.functional.interpolate(photo[None].float(), size=size, mode="bilinear")[0].byte()
            top, left = (int(rng.integers(0, photo.shape[d] - s + 1)) for d, s in ((1, HEIGHT), (2, WIDTH)))
            window = photo[:, top : top + HEIGHT, left : left + WIDTH].permute(1, 2, 0).numpy()
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(window).save(root / split / name / f"{i:05d}.jpg", quality=QUALITY)


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each live process in ``pids`` (Linux ``/proc``)."""
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return seconds


def worker_pids() -> list[int]:
    """This process's children: the DataLoader workers."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]


def run_case(datamodule: str, workers: int, root: Path, image_size: int, batch_size: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)  # DataLoader workers run with one thread; the main process does the same here
    images = len(list((root / "train").rglob("*.jpg")))
    common = dict(image_size=image_size, batch_size=batch_size, num_workers=workers, crop="random_resized")
    if datamodule == "imagefolder":
        from imagetok.data.imagefolder import ImageFolderDataModule

        dm = ImageFolderDataModule(root=str(root), **common)
    else:
        from imagetok.data.webdataset import WebDataModule

        urls = json.loads((root / "shards" / "index.json").read_text())["urls"]
        dm = WebDataModule(urls=urls, val_urls=urls, epoch_length=images, shuffle_buffer=256, resampled=True, **common)
    loader = dm.train_dataloader()
    first = max(1, workers)  # the batch by which every worker has delivered one: steady state from there
    timed = []  # (images, wall seconds, CPU seconds, first-batch wait) of each epoch after the first
    for epoch in range(1 + repeats):
        sampler = loader.batch_sampler.sampler if datamodule == "imagefolder" else loader.sampler
        sampler.set_epoch(epoch)  # as Lightning does: new crops (and, for ImageFolder, a new order)
        start, stamps, images = time.perf_counter(), [], 0
        for batch in loader:
            stamps.append(time.perf_counter() - start)
            assert batch.shape[1:] == (3, image_size, image_size)
            if len(stamps) == first:
                pids = worker_pids() if workers else [os.getpid()]
                cpu_start = cpu_seconds(pids)
            else:
                images += batch.shape[0] if len(stamps) > first else 0
            if len(stamps) == len(loader):  # the last batch: webdataset's workers end with the epoch
                cpu_end = cpu_seconds(pids)
        # CPU seconds of the decoding processes in the window: on a busy machine this, not wall time,
        # says what one worker can do
        cpu = sum(cpu_end[pid] - cpu_start[pid] for pid in cpu_start if pid in cpu_end)
        if epoch > 0:  # the first epoch warms caches and starts workers
            timed.append((images, stamps[-1] - stamps[first - 1], cpu, stamps[0]))
    images, seconds, _, wait = min(timed, key=lambda t: t[1] / t[0])  # best of the timed epochs
    cpu_rate = sum(t[0] for t in timed) / sum(t[2] for t in timed)
    return {"datamodule": datamodule, "num_workers": workers, "images_timed": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1), "images_per_s_per_worker": round(images / seconds / first, 1),
            "images_per_cpu_s": round(cpu_rate, 1), "first_batch_s": round(wait, 2), "repeats": repeats,
            "image_size": image_size, "batch_size": batch_size, "source": f"JPEG {WIDTH}x{HEIGHT} q{QUALITY}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="the data configs' default")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per case (after a warm-up epoch)")
    parser.add_argument("--case", nargs=3, metavar=("DATAMODULE", "WORKERS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), Path(args.case[2]), args.image_size, args.batch_size,
                                  args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="imagetok-data-bench-") as tmp:
        root = Path(tmp)
        write_images(root, args.images)
        sys.path.insert(0, str(ROOT / "data"))
        from make_shards import make_shards

        make_shards(root / "train", root / "shards", shard_size=SHARD_SIZE, progress=False)
        for workers in args.workers:
            rows = {}
            for datamodule in ("imagefolder", "webdataset"):
                rows[datamodule] = run_in_subprocess(__file__, ["--case", datamodule, str(workers), str(root),
                                                                "--image-size", str(args.image_size),
                                                                "--batch-size", str(args.batch_size),
                                                                "--repeats", str(args.repeats)])
                if "error" in rows[datamodule]:
                    raise SystemExit(f"{datamodule} with {workers} workers: {rows[datamodule]['error']}")
            for key in ("images_per_s", "images_per_cpu_s"):
                ratio = rows["webdataset"][key] / rows["imagefolder"][key]
                rows["webdataset"][f"{key}_ratio_vs_imagefolder"] = round(ratio, 2)
            for row in rows.values():
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
