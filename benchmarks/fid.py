"""FID: the Fréchet step (imagetok's float64 eigendecomposition route vs the scipy ``sqrtm`` route that
pytorch-fid / torch-fidelity use) on the same statistics, and end-to-end evaluation throughput.

    python benchmarks/fid.py [--dim 2048] [--repeats 3] [--images 64]

Prints one JSON line per case. The throughput case runs the FID Inception with random weights (no
download needed; the arithmetic is the same as with the real weights) on 32x32 sample crops, which
Inception resizes to 299x299, so it measures what a CPU evaluation costs per image.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.linalg
import torch


def sqrtm_route(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def frechet_case(dim: int, repeats: int) -> dict:
    from imagetok.evaluation.fid import frechet_distance

    rng = np.random.default_rng(0)
    # covariances shaped like Inception pool3 statistics: 10k samples of correlated non-negative features
    a = np.maximum(rng.normal(size=(10_000, dim)) @ (rng.normal(size=(dim, dim)) / dim**0.5), 0)
    b = np.maximum(a[:, rng.permutation(dim)] * 0.9 + 0.1 * rng.normal(size=a.shape), 0)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    timings = {}
    values = {}
    for name, fn in (("imagetok_eigh", frechet_distance), ("scipy_sqrtm", sqrtm_route)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            values[name] = fn(mu1, s1, mu2, s2)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return {"case": "frechet_step", "dim": dim, "imagetok_s": round(timings["imagetok_eigh"], 4),
            "sqrtm_s": round(timings["scipy_sqrtm"], 4), "speedup": round(timings["scipy_sqrtm"] / timings["imagetok_eigh"], 1),
            "imagetok_fid": values["imagetok_eigh"], "sqrtm_fid": values["scipy_sqrtm"],
            "relative_difference": abs(values["imagetok_eigh"] - values["scipy_sqrtm"]) / abs(values["scipy_sqrtm"])}


def throughput_case(images: int) -> dict:
    from imagetok.data.sample import SampleDataModule
    from imagetok.evaluation.inception import InceptionFeatures
    from imagetok.tokenizer import Tokenizer

    torch.manual_seed(0)
    inception = InceptionFeatures("2048", random_weights=True)
    crops = SampleDataModule(image_size=32, val_samples=images).val_dataset()
    batch = torch.stack([crops[i] for i in range(images)])
    u8 = Tokenizer.to_uint8(batch)
    inception(u8[:8])  # warm-up
    start = time.perf_counter()
    for i in range(0, images, 32):
        inception(u8[i:i + 32])
    seconds = time.perf_counter() - start
    return {"case": "inception_features", "images": images, "threads": torch.get_num_threads(),
            "images_per_s": round(images / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(frechet_case(args.dim, args.repeats)), flush=True)
    print(json.dumps(throughput_case(args.images)), flush=True)


if __name__ == "__main__":
    main()
