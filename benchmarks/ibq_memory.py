"""IBQ's index backpropagation at a large codebook: peak extra memory and time of one forward + backward,
imagetok's blocked autograd Function against the same estimator written with plain autograd (the whole
``[tokens, K]`` softmax and one-hot held for the backward), one JSON line per case.

    python benchmarks/ibq_memory.py [--log2 18] [--tokens 256] [--dim 8] [--threads 1]

Each case runs in its own subprocess; both compute the same gradients (checked on a slice of the codes).
"""

from __future__ import annotations

import argparse
import json
import time

from _measure import cap_address_space, peak_rss_mb, run_in_subprocess


def run_case(method: str, log2: int, tokens: int, dim: int, threads: int) -> dict:
    import torch

    from imagetok.quantizers.ibq import _IndexBackprop, ibq_logits, index_backprop_reference

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, requires_grad=True)
    codes = torch.randn(2**log2, dim, requires_grad=True)
    with torch.no_grad():  # largest logit per token, one row at a time: the baseline holds no block of logits
        idx = torch.cat([ibq_logits(x[i : i + 1], codes, "dot", 1.0).argmax(1) for i in range(tokens)])
    cap_address_space(12.0)
    base = peak_rss_mb()
    start = time.perf_counter()
    if method == "blocked":
        rows = max(16, 2**20 // 2**log2)
        out = _IndexBackprop.apply(x, codes, idx, "dot", 1.0, rows)
    else:
        out = index_backprop_reference(x, codes, idx, "dot", 1.0)
    out.pow(2).sum().backward()
    ms = (time.perf_counter() - start) * 1e3
    return {"method": method, "codes": 2**log2, "tokens": tokens, "ms": round(ms, 1),
            "peak_mb": round(max(0.0, peak_rss_mb() - base), 1),
            "grad_checksum": round(float(codes.grad[:1024].double().sum()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2", type=int, default=18)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.log2, args.tokens, args.dim, args.threads)))
        return
    common = ["--log2", str(args.log2), "--tokens", str(args.tokens), "--dim", str(args.dim), "--threads", str(args.threads)]
    for method in ("blocked", "dense"):
        print(json.dumps(run_in_subprocess(__file__, ["--case", method, *common], 900) | {"method": method}), flush=True)


if __name__ == "__main__":
    main()
