"""Quantizer families, forward + backward, imagetok against vector-quantize-pytorch (vqp) side by side:
median time and peak extra memory at 256 tokens x batch 8 (input ``[8, C, 16, 16]``), one JSON line
per case, with ``speed_ratio = vqp_ms / imagetok_ms`` (> 1: imagetok faster) and
``memory_ratio = imagetok_peak_mb / vqp_peak_mb`` (< 1: imagetok smaller).

    python benchmarks/quantizers.py [--families vq,vq256,rq,fsq,lfq,bsq,vq_rotation,simvq,ibq]
                                    [--sizes 10,14,16,18,128]
                                    [--repeats 5] [--threads 2] [--cap-gib 6] [--markdown]

Each side of each case runs in its own subprocess (so the peak resident set belongs to that case
alone), training mode, loss ``z_q.sum() + aux_loss``, ``torch`` threads fixed. A subprocess may map at
most ``--cap-gib`` GiB more than after its imports: a case that needs more is reported as failing
(with the allocator's message) instead of exhausting a shared machine. The vqp columns are left out
when vector-quantize-pytorch is not installed (``pip install -e ".[bench]"``); families whose
imagetok module is not present are skipped with a note.

Settings are equal on both sides: same dim and codebook size, EMA codebook (decay 0.99), commitment
weight 0.25, no k-means, plain straight-through gradients (vqp's rotation trick off); FSQ without
projections; LFQ/BSQ without projections, commitment 0.25, entropy loss weight 0.1, diversity gamma 1,
the same inverse temperature (LFQ 100, BSQ 1), each computing the entropy as it does: vqp exactly over
all ``2^d`` codes (a ``[tokens, 2^d]`` distribution), imagetok's per-sample entropy exactly from the
per-bit factorisation and its codebook entropy over groups of bits (exact for 2^10, an upper bound
from groups of 7, 8, 9 and 8 bits for 2^14, 2^16, 2^18, 2^128; see ``imagetok/quantizers/_binary.py``).
imagetok emits one sub-token per position up to 2^18 and 8 sub-tokens of 16 bits for 2^128.
``vq_rotation`` is the VQ case with the rotation trick on both sides (imagetok ``gradient="rotation"``,
vqp ``rotation_trick=True``); ``simvq`` is imagetok's SimVQ against vqp's ``SimVQ`` (frozen codebook,
linear map, codebook loss weight 1 and commitment 0.25, straight-through on both sides); ``ibq`` has
no vqp counterpart (imagetok only, temperature 1, dot-product logits, double quantization loss).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

from _measure import cap_address_space, median_ms, peak_rss_mb, run_in_subprocess

BATCH, SIDE = 8, 16  # 256 tokens x batch 8
FSQ_LEVELS = {10: [8, 5, 5, 5], 14: [8, 8, 8, 6, 5], 16: [8, 8, 8, 5, 5, 5], 18: [8, 8, 8, 8, 8, 8]}
# family -> (sizes as log2 of the codebook, latent channels for a size)
FAMILIES = {
    "vq": ([10, 14, 16, 18], lambda log2: 8),  # LlamaGen-style low-dimensional lookup
    "vq256": ([14], lambda log2: 256),  # taming-style wide codes
    "rq": ([10, 14, 16, 18], lambda log2: 8),  # depth 4
    "fsq": ([10, 14, 16, 18], lambda log2: len(FSQ_LEVELS[log2])),
    "lfq": ([10, 14, 16, 18, 128], lambda log2: log2),
    "bsq": ([10, 14, 16, 18, 128], lambda log2: log2),
    "vq_rotation": ([10, 14, 16, 18], lambda log2: 8),
    "simvq": ([10, 14, 16, 18], lambda log2: 8),
    "ibq": ([10, 14, 16, 18], lambda log2: 8),
}
# both libraries' soft assignment softmax(inv_temperature * 2 c.x): MAGVIT-v2's 100 (vqp's default) for
# LFQ, BSQ-ViT's 1 (imagetok's default) for BSQ
INV_TEMPERATURE = {"lfq": 100.0, "bsq": 1.0}
IMAGETOK_MODULES = {"vq": "vq", "vq256": "vq", "rq": "residual", "fsq": "fsq", "lfq": "lfq", "bsq": "bsq",
                    "vq_rotation": "vq", "simvq": "simvq", "ibq": "ibq"}


def build_imagetok(family: str, log2: int, dim: int):
    """imagetok quantizer and a function ``z -> scalar loss`` for one case."""
    if family in ("vq", "vq256", "vq_rotation"):
        from imagetok.quantizers.vq import VectorQuantizer
        module = VectorQuantizer(dim=dim, codebook_size=2**log2, codebook_update="ema", decay=0.99, beta=0.25,
                                 gradient="rotation" if family == "vq_rotation" else "ste")
    elif family == "simvq":
        from imagetok.quantizers.simvq import SimVectorQuantizer
        module = SimVectorQuantizer(dim=dim, codebook_size=2**log2, beta=0.25)
    elif family == "ibq":
        from imagetok.quantizers.ibq import IndexBackpropQuantizer
        module = IndexBackpropQuantizer(dim=dim, codebook_size=2**log2, beta=0.25, temperature=1.0)
    elif family == "rq":
        from imagetok.quantizers.residual import ResidualVectorQuantizer
        module = ResidualVectorQuantizer(dim=dim, codebook_size=2**log2, depth=4, codebook_update="ema", decay=0.99,
                                         beta=0.25)
    elif family == "fsq":
        from imagetok.quantizers.fsq import FiniteScalarQuantizer
        module = FiniteScalarQuantizer(dim=dim, levels=FSQ_LEVELS[log2])
    elif family == "lfq":
        from imagetok.quantizers.lfq import LookupFreeQuantizer
        module = LookupFreeQuantizer(dim=dim, bits=log2, **binary_options(family, log2))
    else:
        from imagetok.quantizers.bsq import BinarySphericalQuantizer
        module = BinarySphericalQuantizer(dim=dim, bits=log2, **binary_options(family, log2))

    def loss(z):
        out = module(z)
        return out.z_q.sum() + out.loss

    return module, loss


def binary_options(family: str, log2: int) -> dict:
    """imagetok LFQ/BSQ settings of a case: one sub-token per position up to 18 bits, 16-bit sub-tokens
    beyond (2^128 as 8 x 2^16); the codebook entropy over the default groups (the largest divisor of
    the bits up to 12: 2^10 exact, 2^14 as 2 x 7 bits, 2^16 as 2 x 8, 2^18 as 2 x 9, 2^128 as 16 x 8).
    The weights and the inverse temperature are the ones vqp is given."""
    return {"bits_per_token": log2 if log2 <= 18 else 16, "entropy_group_bits": None, "entropy_weight": 0.1,
            "codebook_entropy_weight": 1.0, "commitment_weight": 0.25, "inv_temperature": INV_TEMPERATURE[family]}


def build_vqp(family: str, log2: int, dim: int):
    """vector-quantize-pytorch's module for the same case and a function ``z -> scalar loss``."""
    import vector_quantize_pytorch as vqp

    # plain straight-through as imagetok (vqp's default for dim > 1 is the rotation trick, extra work)
    if family in ("vq", "vq256", "vq_rotation"):
        module = vqp.VectorQuantize(dim=dim, codebook_size=2**log2, decay=0.99, commitment_weight=0.25,
                                    accept_image_fmap=True, rotation_trick=family == "vq_rotation", kmeans_init=False)
    elif family == "simvq":
        module = vqp.SimVQ(dim=dim, codebook_size=2**log2, channel_first=True, rotation_trick=False,
                           input_to_quantize_commit_loss_weight=0.25, commitment_weight=1.0)
    elif family == "rq":
        # tokens channels last: vqp 1.32's ResidualVQ fails on image maps (accept_image_fmap=True) with
        # "Sizes of tensors must match" when it stacks the residuals of the levels
        module = vqp.ResidualVQ(dim=dim, num_quantizers=4, codebook_size=2**log2, decay=0.99, commitment_weight=0.25,
                                rotation_trick=False, kmeans_init=False)
    elif family == "fsq":
        module = vqp.FSQ(levels=FSQ_LEVELS[log2], dim=dim, channel_first=True)
    else:  # BSQ is vqp's LFQ with spherical=True: l2-normalised inputs and codes +-1/sqrt(d)
        module = vqp.LFQ(dim=dim, codebook_size=2**log2, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                         diversity_gamma=1.0, spherical=family == "bsq", channel_first=True)

    def loss(z):
        if family in ("lfq", "bsq"):
            out = module(z, inv_temperature=INV_TEMPERATURE[family])
        elif family == "rq":
            out = module(z.flatten(2).transpose(1, 2))  # [B, C, h, w] -> [B, h*w, C]
        else:
            out = module(z)
        aux = out[2].sum() if len(out) > 2 else 0.0  # FSQ returns (quantized, indices) only
        return out[0].sum() + aux

    return module, loss


def run_case(side: str, family: str, log2: int, repeats: int, threads: int, cap_gib: float) -> dict:
    """One side of one case, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    build = build_imagetok if side == "imagetok" else build_vqp
    dim = FAMILIES[family][1](log2)

    def step(loss_fn, z):
        loss_fn(z).backward()

    # run a tiny case of the same family first: kernels and thread pools are set up outside the measurement
    tiny = 10 if family == "fsq" else 4
    torch.manual_seed(0)
    small, small_loss = build(family, tiny, FAMILIES[family][1](tiny))
    step(small_loss, torch.randn(2, FAMILIES[family][1](tiny), 4, 4, requires_grad=True))
    del small, small_loss
    cap_address_space(cap_gib)
    base = peak_rss_mb()
    torch.manual_seed(0)
    module, loss_fn = build(family, log2, dim)
    module.train()
    z = torch.randn(BATCH, dim, SIDE, SIDE, requires_grad=True)
    ms = median_ms(lambda: step(loss_fn, z), repeats, warmup=1)
    result = {"ms": round(ms, 2), "peak_mb": round(max(0.0, peak_rss_mb() - base), 1)}
    if side == "imagetok" and family in ("lfq", "bsq"):
        result["setting"] = (f"{module.num_tokens} x 2^{module.bits_per_token} sub-tokens, entropy over "
                             f"{module.bits // module.entropy_group_bits} x {module.entropy_group_bits} bits")
    return result


def vqp_supports(family: str, log2: int) -> str | None:
    """None when vqp can be tried on this case, else why not (decided without allocating)."""
    if family == "ibq":
        return "not available: vector-quantize-pytorch has no IBQ"
    if family in ("lfq", "bsq") and log2 > 62:
        return (f"not supported: LFQ materialises all 2^{log2} codes (a [2^{log2}, {log2}] buffer) and the "
                f"[tokens, 2^{log2}] entropy distances; torch.arange(2**{log2}) overflows int64")
    return None


def compare(family: str, log2: int, args: argparse.Namespace, with_vqp: bool) -> dict:
    common = ["--repeats", str(args.repeats), "--threads", str(args.threads), "--cap-gib", str(args.cap_gib)]
    line = {"family": family, "codebook": f"2^{log2}", "codes": _codes(family, log2),
            "dim": FAMILIES[family][1](log2), "tokens": BATCH * SIDE * SIDE}
    ours = run_in_subprocess(__file__, ["--case", "imagetok", family, str(log2), *common], args.timeout)
    line["imagetok_ms"], line["imagetok_peak_mb"] = ours.get("ms"), ours.get("peak_mb")
    if "setting" in ours:
        line["imagetok_setting"] = ours["setting"]
    if "error" in ours:
        line["imagetok_error"] = ours["error"]
    if not with_vqp:
        return line
    reason = vqp_supports(family, log2)
    theirs = {"error": reason} if reason else run_in_subprocess(
        __file__, ["--case", "vqp", family, str(log2), *common], args.timeout)
    line["vqp_ms"], line["vqp_peak_mb"] = theirs.get("ms"), theirs.get("peak_mb")
    if "error" in theirs:
        line["vqp_error"] = theirs["error"]
    elif "error" not in ours:
        line["speed_ratio"] = round(theirs["ms"] / ours["ms"], 2)
        line["memory_ratio"] = round(ours["peak_mb"] / max(theirs["peak_mb"], 0.1), 3)
    return line


def _codes(family: str, log2: int) -> int:
    return math.prod(FSQ_LEVELS[log2]) if family == "fsq" else 2**log2


def markdown(lines: list[dict]) -> str:
    rows = ["| family | codebook | dim | imagetok ms | vqp ms | speed ratio | imagetok MB | vqp MB | memory ratio | imagetok setting |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in lines:
        vqp_ms = r.get("vqp_ms") if "vqp_error" not in r else "n/a" if r["vqp_error"].startswith("not available") else "fails"
        rows.append(f"| {r['family']} | {r['codebook']} | {r['dim']} | {r.get('imagetok_ms') or 'fails'} | "
                    f"{vqp_ms if vqp_ms is not None else '-'} | {r.get('speed_ratio', '-')} | "
                    f"{r.get('imagetok_peak_mb', '-')} | {r.get('vqp_peak_mb') or '-'} | {r.get('memory_ratio', '-')} | "
                    f"{r.get('imagetok_setting', '')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from: " + ", ".join(FAMILIES))
    parser.add_argument("--sizes", default="10,14,16,18,128", help="log2 of the codebook sizes to run")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every case")
    parser.add_argument("--cap-gib", type=float, default=6.0, help="address space a case may add after imports")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case and side")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table at the end")
    parser.add_argument("--case", nargs=3, metavar=("SIDE", "FAMILY", "LOG2"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        side, family, log2 = args.case[0], args.case[1], int(args.case[2])
        print(json.dumps(run_case(side, family, log2, args.repeats, args.threads, args.cap_gib)))
        return
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {list(FAMILIES)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    with_vqp = importlib.util.find_spec("vector_quantize_pytorch") is not None
    if not with_vqp:
        print(json.dumps({"note": "vector-quantize-pytorch not installed: imagetok columns only"}), flush=True)
    lines = []
    for family in families:
        if importlib.util.find_spec(f"imagetok.quantizers.{IMAGETOK_MODULES[family]}") is None:
            print(json.dumps({"family": family, "note": f"skipped: imagetok.quantizers.{IMAGETOK_MODULES[family]} "
                                                        "is not present"}), flush=True)
            continue
        for log2 in (s for s in FAMILIES[family][0] if s in sizes):
            lines.append(compare(family, log2, args, with_vqp))
            print(json.dumps(lines[-1]), flush=True)
    if args.markdown:
        print(markdown(lines))


if __name__ == "__main__":
    main()
