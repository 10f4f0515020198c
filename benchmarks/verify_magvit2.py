"""Check ``from=magvit2`` against SEED-Voken's own model classes: Open-MAGVIT2 (LFQ) and IBQ.

    git --git-dir=<mirror of TencentARC/SEED-Voken> archive HEAD | tar -x -C /tmp/magvit2_src
    python benchmarks/verify_magvit2.py --magvit2 /tmp/magvit2_src [--fast]

For each configuration the original ``VQModel`` / ``IBQ`` is built from the project's published yaml
(or a small variant; the loss replaced by its ``DummyLoss``: no LPIPS download) with seeded random
weights and ``use_ema: True``; its EMA shadows are then perturbed so that using the wrong set shows.
It is saved as released (``torch.save({"state_dict": model.state_dict(), ...})``), converted with
``imagetok.export`` as the CLI does, and both models encode the same random images: inside
``ema_scope`` as SEED-Voken's ``evaluation_image.py`` does, then ``decode(quant)``.

Printed, one JSON line per configuration: index agreement (share of equal sub-tokens) and the largest
reconstruction difference in float32 and float64. imagetok's quantizers compute in float32 by design,
so the float64 row runs the encoder/decoder in float64 and looks the codes up in float64 from the
indices (exact for LFQ's +-1 codes). Nothing of SEED-Voken is imported unless the directory exists.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from imagetok.export.converters import convert_magvit2, load_original_checkpoint

LFQ_YAML = "configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml"
IBQ_YAML = {16384: "configs/IBQ/gpu/imagenet_ibqgan_16384.yaml", 262144: "configs/IBQ/gpu/imagenet_ibqgan_262144.yaml"}
SMALL = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2}


def _init_args(source: Path, relative: str, family: str, small: bool, **extra) -> dict:
    init = yaml.safe_load((source / relative).read_text())["model"]["init_args"]
    loss = "src.Open_MAGVIT2.modules.losses.vqperceptual.DummyLoss" if family == "lfq" else \
        "src.IBQ.modules.losses.vqperceptual.DummyLoss"
    init = {**init, "lossconfig": {"target": loss}, "use_ema": True, "ckpt_path": None, **extra}
    if small:
        init["ddconfig"] = {**init["ddconfig"], **SMALL}
        if family == "ibq":  # attention on the middle level (placed by ddconfig.resolution=256), few codes
            init["ddconfig"]["attn_resolutions"] = [128]
            init["n_embed"], init["embed_dim"] = 1024, 32
    return init


def _original(family: str, init: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "lfq":
        from src.Open_MAGVIT2.models.lfqgan import VQModel as model_class
    else:
        from src.IBQ.models.ibqgan import IBQ as model_class
    model = model_class(**copy.deepcopy(init)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # GroupNorm affines and biases away from 1 / 0
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.model_ema.named_buffers():  # EMA differs from the raw weights
            if b.is_floating_point() and b.ndim > 0:
                b.add_(0.02 * torch.randn_like(b) * b.std().clamp_min(1e-3))
    return model


def _reference(model: torch.nn.Module, family: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, h, w, K], reconstruction) as SEED-Voken's evaluation computes them."""
    with torch.no_grad(), model.ema_scope():
        if family == "lfq":
            quant, _, indices, _ = model.encode(x)
        else:
            quant, _, (_, _, indices) = model.encode(x)
        recon = model.decode(quant)
    b, _, h, w = quant.shape
    parts = indices if isinstance(indices, tuple) else (indices,)
    return torch.stack([p.reshape(b, h, w) for p in parts], -1), recon


def _decode64(tok64, ids: torch.Tensor) -> torch.Tensor:
    """Our decode in float64: the codes looked up in float64 (imagetok's lookup returns float32)."""
    if hasattr(tok64.quantizer, "codebook"):
        latents = F.embedding(ids[..., 0], tok64.quantizer.codebook).permute(0, 3, 1, 2)
    else:
        latents = tok64.indices_to_latents(ids).double()  # +-1: exact
    with torch.no_grad():
        return tok64.decode_latents(latents)


def verify(source: Path, name: str, family: str, init: dict, image_size: int, batch: int, config: dict | None) -> dict:
    model = _original(family, init, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.ckpt"
        torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.2.0",
                    "state_dict": model.state_dict()}, path)
        tok = convert_magvit2(load_original_checkpoint(path), config)
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref_ids, ref = _reference(model, family, x)
    ids = tok.encode(x)
    with torch.no_grad():
        ours = tok.decode(ids)
    model64, x64 = model.double(), x.double()
    ref_ids64, ref64 = _reference(model64, family, x64)
    tok64 = copy.deepcopy(tok).double()
    ids64 = tok64.encode(x64)
    ours64 = _decode64(tok64, ids64)
    return {"config": name, "image": f"{batch}x{image_size}px", "tokens": list(ids.shape[1:]),
            "codebook_sizes": tok.codebook_sizes,
            "index_agreement": float((ids == ref_ids).float().mean()),
            "index_agreement_float64": float((ids64 == ref_ids64).float().mean()),
            "max_decode_diff_float32": float((ours - ref).abs().max()),
            "max_decode_diff_float64": float((ours64 - ref64).abs().max()),
            "recon_abs_max": float(ref.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--magvit2", type=Path, default=Path("/tmp/magvit2_src"), help="SEED-Voken source tree")
    parser.add_argument("--fast", action="store_true", help="small configurations only")
    args = parser.parse_args()
    if not (args.magvit2 / "src" / "Open_MAGVIT2").is_dir():
        print(f"skipped: no SEED-Voken source at {args.magvit2} (see the docstring)")
        return
    sys.path.insert(0, str(args.magvit2))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    factorized = {"model": {"class_path": "src.Open_MAGVIT2.models.lfqgan.VQModel",
                            "init_args": {"token_factorization": True, "factorized_bits": [9, 9]}}}
    cases = [
        ("Open-MAGVIT2 small (ch 32, [1,2,2], 2 blocks, 2^18)", "lfq", _init_args(args.magvit2, LFQ_YAML, "lfq", True), 64, 2, None),
        ("Open-MAGVIT2 small, token_factorization [9, 9]", "lfq",
         _init_args(args.magvit2, LFQ_YAML, "lfq", True, token_factorization=True, factorized_bits=[9, 9]), 64, 2, factorized),
        ("Open-MAGVIT2 small, token_factorization [6, 12] (the AR configs')", "lfq",
         _init_args(args.magvit2, LFQ_YAML, "lfq", True, token_factorization=True, factorized_bits=[6, 12]), 64, 2,
         {"model": {**factorized["model"], "init_args": {"token_factorization": True, "factorized_bits": [6, 12]}}}),
        ("IBQ small (ch 32, [1,2,2], 2 blocks, attention at level 1, 1024 x 32)", "ibq", _init_args(args.magvit2, IBQ_YAML[16384], "ibq", True), 64, 2, None),
    ]
    if not args.fast:
        cases += [
            (f"Open-MAGVIT2 published ({LFQ_YAML})", "lfq", _init_args(args.magvit2, LFQ_YAML, "lfq", False), 128, 1, None),
            (f"IBQ published ({IBQ_YAML[16384]})", "ibq", _init_args(args.magvit2, IBQ_YAML[16384], "ibq", False), 128, 1, None),
            (f"IBQ published ({IBQ_YAML[262144]})", "ibq", _init_args(args.magvit2, IBQ_YAML[262144], "ibq", False), 128, 1, None),
        ]
    for name, family, init, size, batch, config in cases:
        print(json.dumps(verify(args.magvit2, name, family, init, size, batch, config)), flush=True)


if __name__ == "__main__":
    main()
