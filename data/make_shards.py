"""Pack images into webdataset tar shards for ``data=webdataset``.

    python data/make_shards.py /data/imagenet/train /data/shards/train --shard-size 1000
    python data/make_shards.py files.txt /data/shards/val --max-bytes 1e9 --reencode --quality 95 --max-side 512

The input is an ImageFolder tree (each subfolder of ``input`` is a class; labels are the sorted
folder names' positions) or a text file listing image paths, one a line (label -1; paths relative
to the list's folder). Each sample is written with ``webdataset.ShardWriter`` as
``__key__`` (``%08d`` position), the image (original bytes under their own extension, or JPEG
re-encoded with ``--reencode``/``--max-side``), ``cls`` (integer label) and ``json`` (original
width/height, source path relative to the input, label name). A shard closes before it would hold
more than ``--shard-size`` images or its tar file would grow past ``--max-bytes`` (an image larger
than that alone gets a shard of its own). Unreadable images are skipped and listed at the end and
in ``index.json`` (shards, sample counts, classes, skipped files).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp",
                    ".tif": "tiff", ".tiff": "tiff"}


class InputError(ValueError):
    """The input directory or list is missing or holds no (readable) images."""


def tar_entry_bytes(sizes: Iterable[int]) -> int:
    """Bytes that members of these sizes take in a tar file: a header block each, data padded to blocks
    (short ASCII names and an integer mtime need no extended pax header)."""
    return sum(tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for size in sizes)


def tar_file_limit(max_bytes: float) -> int:
    """Member bytes a shard may hold so that its file stays within ``max_bytes``: closing a tar adds two
    zero blocks and pads the file to a whole record (``tarfile.RECORDSIZE``)."""
    return int(max_bytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE - 2 * tarfile.BLOCKSIZE


def list_inputs(source: Path) -> tuple[list[tuple[Path, int]], list[str], Path]:
    """``([(image path, label)], class names, base directory)`` from a tree or a list file."""
    if source.is_file():
        base = source.parent
        lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        if not lines:
            raise InputError(f"input list {source} names no image files (one path a line)")
        return [(base / line, -1) for line in lines], [], base  # an absolute line stays absolute
    if not source.is_dir():
        raise InputError(f"input {source} is neither a directory (ImageFolder tree) nor a file listing images")
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    if classes:
        items = [(p, label) for label, name in enumerate(classes) for p in sorted((source / name).rglob("*"))
                 if p.suffix.lower() in IMAGE_EXTENSIONS]
    else:  # a flat folder of images: no labels
        items = [(p, -1) for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise InputError(f"input {source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return items, classes, source


def encode(path: Path, reencode: bool, quality: int, max_side: int | None) -> tuple[str, bytes, tuple[int, int]]:
    """``(extension, bytes, (width, height) of the original)``; raises OSError, ValueError or PIL's
    DecompressionBombError (an image of absurd size) if unreadable."""
    with Image.open(path) as image:
        image.load()  # decode fully: a truncated file fails here, not during training
        size = image.size
        if not reencode and max_side is None:
            return IMAGE_EXTENSIONS[path.suffix.lower()], path.read_bytes(), size
        image = image.convert("RGB")
        if max_side is not None and max(size) > max_side:
            scale = max_side / max(size)
            image = image.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return "jpg", out.getvalue(), size


def make_shards(source: Path, output: Path, shard_size: int = 1000, max_bytes: float = 3e9, reencode: bool = False,
                quality: int = 95, max_side: int | None = None, progress: bool = True) -> dict:
    """Write ``output/shard-%06d.tar`` and ``output/index.json``; returns the index."""
    items, classes, base = list_inputs(source)
    output.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    skipped: list[dict] = []
    writer: wds.ShardWriter | None = None

    def finished(fname: str) -> None:  # ShardWriter calls this as each shard closes
        if writer.count:
            shards.append({"name": Path(fname).name, "samples": writer.count, "bytes": Path(fname).stat().st_size})
        else:
            Path(fname).unlink()

    # an integer mtime: a float one (webdataset's default, time.time()) adds a pax header to every member
    writer = wds.ShardWriter(str(output / "shard-%06d.tar"), maxcount=shard_size, maxsize=max_bytes,
                             post=finished, verbose=0, mtime=int(time.time()))
    limit, shard_bytes = tar_file_limit(max_bytes), 0
    with writer, tqdm(items, desc=f"shards -> {output}", unit="img", disable=not progress) as bar:
        for index, (path, label) in enumerate(bar):
            try:
                ext, data, (width, height) = encode(path, reencode, quality, max_side)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
                skipped.append({"path": str(path), "error": f"{type(err).__name__}: {err}"})
                bar.set_postfix(skipped=len(skipped))
                continue
            meta = {"width": width, "height": height, "path": str(path.relative_to(base)) if path.is_relative_to(base)
                    else str(path), "label": label, "label_name": classes[label] if label >= 0 else None}
            # bytes already, so the size of every tar member is known before it is written
            sample = {ext: data, "cls": str(label).encode(), "json": json.dumps(meta).encode()}
            size = tar_entry_bytes(len(v) for v in sample.values())
            if writer.count and (shard_bytes + size > limit or writer.count >= shard_size):
                writer.next_stream()  # close this shard before the sample would take it past a limit
                shard_bytes = 0
            writer.write({"__key__": f"{index:08d}", **sample})
            shard_bytes += size
    if not shards:
        raise InputError(f"none of the {len(items)} images in {source} could be read, e.g. {skipped[0]['path']}: "
                         f"{skipped[0]['error']}")
    index = {"shards": shards, "samples": sum(s["samples"] for s in shards), "classes": classes,
             "skipped": skipped, "source": str(source),
             "urls": f"{output}/shard-{{{0:06d}..{max(len(shards) - 1, 0):06d}}}.tar"}
    (output / "index.json").write_text(json.dumps(index, indent=1))
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="ImageFolder tree (class subfolders) or a text file of image paths")
    parser.add_argument("output", type=Path, help="directory for shard-%%06d.tar and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--max-bytes", type=float, default=3e9, help="bytes per shard (default 3e9); a shard closes "
                        "at whichever limit comes first")
    parser.add_argument("--reencode", action="store_true", help="store JPEG at --quality instead of the original bytes")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    parser.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side exceeds this "
                        "(implies re-encoding)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.max_bytes <= 0 or not 1 <= args.quality <= 100 or (args.max_side or 1) < 1:
        parser.error("--shard-size, --max-bytes and --max-side must be positive, --quality in 1..100")
    try:
        index = make_shards(args.input, args.output, args.shard_size, args.max_bytes, args.reencode, args.quality,
                            args.max_side, progress=not args.no_progress)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index['samples']} images into {len(index['shards'])} shards: {index['urls']}")
    if index["skipped"]:
        print(f"skipped {len(index['skipped'])} unreadable images:")
        for item in index["skipped"]:
            print(f"  {item['path']}: {item['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
