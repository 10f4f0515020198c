"""Nearest-code search: imagetok's blocked search against the full ``tokens x codebook`` distance
matrix as other code builds it (``torch.cdist(...).argmin``, and the expanded
``|z|^2 + |e|^2 - 2 z.e`` form of taming-transformers / LlamaGen), time and peak extra memory,
one JSON line per case.

    python benchmarks/vq_search.py [--tokens 2048] [--dim 8] [--repeats 5]

Each case runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to that case alone; time
is the median of ``repeats`` searches.
"""

from __future__ import annotations

import argparse
import json

from _measure import median_ms, peak_rss_mb, run_in_subprocess


def run_case(method: str, tokens: int, codebook: int, dim: int, repeats: int) -> dict:
    import torch

    from imagetok.quantizers._utils import nearest_code

    torch.manual_seed(0)
    searches = {
        "imagetok_blocked": lambda z, c: nearest_code(z, c),
        "full_cdist": lambda z, c: torch.cdist(z, c).argmin(1),
        "full_expanded": lambda z, c: (z.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1) - 2 * z @ c.t()).argmin(1),
    }
    search = searches[method]
    search(torch.randn(4, dim), torch.randn(8, dim))  # initialise kernels outside the measurement
    z, codes = torch.randn(tokens, dim), torch.randn(codebook, dim)
    base = peak_rss_mb()
    idx = search(z, codes)
    peak = peak_rss_mb()
    ms = median_ms(lambda: search(z, codes), repeats, warmup=0)
    return {"method": method, "tokens": tokens, "codebook": codebook, "dim": dim, "ms": round(ms, 2),
            "peak_extra_mb": round(max(0.0, peak - base), 1), "checksum": int(idx.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="256 tokens x batch 8")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "CODEBOOK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, codebook = args.case[0], int(args.case[1])
        print(json.dumps(run_case(method, args.tokens, codebook, args.dim, args.repeats)))
        return
    for dim, log2 in [(args.dim, 10), (args.dim, 14), (args.dim, 16), (args.dim, 18), (256, 14)]:
        rows = {}
        for method in ("imagetok_blocked", "full_cdist", "full_expanded"):
            rows[method] = run_in_subprocess(__file__, ["--case", method, str(2**log2), "--tokens", str(args.tokens),
                                                        "--dim", str(dim), "--repeats", str(args.repeats)])
            if "error" in rows[method]:
                raise SystemExit(f"{method} at codebook 2^{log2}: {rows[method]['error']}")
        ours = rows.pop("imagetok_blocked")
        line = {k: ours[k] for k in ("tokens", "codebook", "dim", "ms", "peak_extra_mb")}
        for name, other in rows.items():
            assert other["checksum"] == ours["checksum"], f"{name} disagrees with imagetok"
            line[f"{name}_ms"], line[f"{name}_peak_extra_mb"] = other["ms"], other["peak_extra_mb"]
            line[f"speedup_vs_{name}"] = round(other["ms"] / ours["ms"], 2)
            line[f"memory_ratio_vs_{name}"] = round(ours["peak_extra_mb"] / max(other["peak_extra_mb"], 0.1), 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
