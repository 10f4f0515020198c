"""Converters checked against the original implementation: build the source project's own model from
its code (seeded random weights), save it in the format the project releases, convert the file with
imagetok, and compare token indices and decodes in float32 and float64. Prints one JSON line per
configuration.

    git --git-dir=<fetched FoundationVision/VAR> archive HEAD models dist.py | tar x -C /tmp/var_src
    python benchmarks/verify_converters.py --var /tmp/var_src [--configs small published]

The source code is imported from the given directory at run time and never copied into imagetok; when
the directory is absent the check is skipped with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PUBLISHED_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# name -> the VQVAE arguments of each case (VAR fixes ch_mult (1,1,2,2,4), 2 res blocks; image size = 16 x last scale)
VAR_CONFIGS = {
    # every phi-sharing layout (partial 4, shared 1, one per scale 0) at 64 px, then VAR's 10 scales at 256 px
    "small": [*({"vocab_size": 512, "z_channels": 8, "ch": 32, "share_quant_resi": s, "v_patch_nums": (1, 2, 3, 4)}
                for s in (4, 1, 0)),
              {"vocab_size": 512, "z_channels": 8, "ch": 32, "share_quant_resi": 4, "v_patch_nums": PUBLISHED_SCALES}],
    "published": [{"vocab_size": 4096, "z_channels": 32, "ch": 160, "share_quant_resi": 4, "v_patch_nums": PUBLISHED_SCALES}],
}


def _smooth_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] with structure at several scales (coarse noise upsampled plus fine noise)."""
    coarse = F.interpolate(torch.rand(batch, 3, size // 16, size // 16, generator=generator), size=(size, size), mode="bicubic")
    fine = torch.rand(batch, 3, size, size, generator=generator)
    return (0.8 * coarse + 0.2 * fine).clamp(0, 1) * 2 - 1


def _var_model(src: Path, args: dict, seed: int) -> torch.nn.Module:
    """VAR's own VQVAE with seeded random weights: default inits, GroupNorm affines and the codebook
    perturbed (so that a wrong mapping of either shows), codes at the latents' scale (so that every
    scale picks varied codes)."""
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from models.vqvae import VQVAE  # VAR's code, from the fetched snapshot

    torch.manual_seed(seed)
    vae = VQVAE(test_mode=True, **args)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".norm" in name or "norm_out" in name:
                p.add_(torch.randn_like(p) * 0.1)
        size = 16 * args["v_patch_nums"][-1]
        f = vae.quant_conv(vae.encoder(_smooth_images(2, size, torch.Generator().manual_seed(seed + 1))))
        vae.quantize.embedding.weight.normal_(0, float(f.std()) * 0.5)
    return vae.eval()


def _compare(vae: torch.nn.Module, tok, x: torch.Tensor) -> dict:
    """Index agreement per scale and decode differences of VAR vs imagetok on images ``x``."""
    with torch.no_grad():
        var_idx = vae.img_to_idxBl(x)  # list of [B, s*s], coarse to fine
        ours = tok.quantizer.scale_maps(tok.encode(x))
        agree = [float((o.reshape(o.shape[0], -1) == v).float().mean()) for o, v in zip(ours, var_idx)]
        ids = torch.cat(var_idx, dim=1).unsqueeze(-1)  # VAR's tokens decoded by both: independent of encode
        if x.dtype == torch.float64:  # embed_to_fhat builds f_hat in float32; VAR's float64 path is this one
            var_fhat = vae.quantize.f_to_idxBl_or_fhat(vae.quant_conv(vae.encoder(x)), to_fhat=True)[-1]
        else:
            ms_h = [vae.quantize.embedding(i).transpose(1, 2).reshape(i.shape[0], vae.Cvae, s, s)
                    for i, s in zip(var_idx, vae.quantize.v_patch_nums)]
            var_fhat = vae.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=True)
        var_recon = vae.decoder(vae.post_quant_conv(var_fhat))  # fhat_to_img before its clamp(-1, 1)
        our_fhat = tok.indices_to_latents(ids)
        our_recon = tok.decode(ids)
        clamped = vae.idxBl_to_img(var_idx, same_shape=True, last_one=True) if x.dtype == torch.float32 else var_recon.clamp(-1, 1)
    return {"index_agreement_per_scale": agree, "latent_max_diff": float((our_fhat - var_fhat).abs().max()),
            "decode_max_diff": float((our_recon - var_recon).abs().max()),
            "decode_clamped_max_diff": float((our_recon.clamp(-1, 1) - clamped).abs().max()),
            "recon_range": [float(var_recon.min()), float(var_recon.max())]}


def verify_var(src: Path, names: list[str], batch: int) -> None:
    from imagetok.export.converters import convert_var, load_original_checkpoint

    commit = (src / "COMMIT").read_text().strip() if (src / "COMMIT").is_file() else "unknown"
    for name in names:
        for i, args in enumerate(VAR_CONFIGS[name]):
            start = time.perf_counter()
            vae = _var_model(src, args, seed=i)
            with tempfile.TemporaryDirectory() as tmp:  # the released format: a bare state_dict .pth
                path = Path(tmp) / f"vae_ch{args['ch']}v{args['vocab_size']}z{args['z_channels']}.pth"
                torch.save(vae.state_dict(), path)
                tok = convert_var(load_original_checkpoint(path), scales=args["v_patch_nums"])
            size = 16 * args["v_patch_nums"][-1]
            x = _smooth_images(batch, size, torch.Generator().manual_seed(100 + i))
            row = {"source": "FoundationVision/VAR", "commit": commit, "config": name, **args, "image_size": size,
                   "batch": batch, "tokens": tok.token_shape(size)[0]}
            row["float32"] = _compare(vae, tok, x)
            row["float64"] = _compare(vae.double(), tok.double(), x.double())
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--var", type=Path, help="directory holding VAR's models/ and dist.py (git archive of the repo)")
    parser.add_argument("--configs", nargs="+", default=["small", "published"], choices=sorted(VAR_CONFIGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.var is None or not (args.var / "models" / "vqvae.py").is_file():
        print(f"skipped VAR: no models/vqvae.py under {args.var} (pass --var <dir with VAR's code>)")
        return
    verify_var(args.var, args.configs, args.batch)


if __name__ == "__main__":
    main()
