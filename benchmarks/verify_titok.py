"""Check ``from=titok`` against bytedance/1d-tokenizer's own ``TiTok`` class (Yu et al. 2024,
https://arxiv.org/abs/2406.07550).

    git --git-dir=<mirror of bytedance/1d-tokenizer> archive HEAD modeling configs | tar -x -C /tmp/titok_src
    python benchmarks/verify_titok.py --titok /tmp/titok_src [--fast]

For each configuration the original ``TiTok`` is built from the repo's ``configs/infer/TiTok/*.yaml``
(published, or at 64x64 with 32 tokens: small) with seeded random weights, every matrix drawn with
std ``fan_in ** -0.5`` and every vector moved off its 0 / 1 initialisation, so that softmaxes, tanh
and GroupNorms all act. It is saved as released, either ``torch.save(model.state_dict())`` (the
``.bin`` files) or ``model.save_pretrained`` (the Hub repos: ``model.safetensors`` + ``config.json``,
converted with ``config=``), converted with the CLI's reader and converter, and both encode the same
random images: TiTok's ``encode(x)[1]["min_encoding_indices"]`` and ``decode_tokens`` against our
``encode`` / ``decode``. TiTok's images are in [0, 1], ours in [-1, 1]: the original gets
``(x + 1) / 2`` and its output is compared as ``2 y - 1``.

Last, MaskGIT-VQGAN's encoder, quantizer and decoder as TiTok's ``PretrainedTokenizer`` builds them
(the frozen grid tokenizer whose codes TiTok's stage 1 predicts) against
:mod:`imagetok.nets.maskgit_vqgan` with a ``vq`` codebook.

Printed, one JSON line per configuration: index agreement and the largest decode difference in
float32 and float64 (both models cast with ``.double()``; the codes looked up in float64 from the
indices, since imagetok's lookup returns float32). Nothing of 1d-tokenizer is imported unless the
directory exists; ``accelerate`` (imported by TiTok's quantizer for its training-time codebook
clustering only) is stubbed when it is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from imagetok.export.converters import load_original_checkpoint
from imagetok.export.converters.titok import convert_titok, load_titok_config


def _stub_accelerate() -> None:
    try:
        import accelerate.utils.operations  # noqa: F401
    except ImportError:
        def gather(*_, **__):
            raise RuntimeError("accelerate stub: only TiTok's training-time clustering_vq gathers")

        for name in ("accelerate", "accelerate.utils", "accelerate.utils.operations"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["accelerate.utils.operations"].gather = gather


def _config(source: Path, name: str, small: bool):
    from omegaconf import OmegaConf

    config = OmegaConf.load(source / "configs" / "infer" / "TiTok" / f"{name}.yaml")
    config.model.pop("generator", None)
    if small:
        config.dataset.preprocessing.crop_size = 64
        config.model.vq_model.num_latent_tokens = 32
    return config


def _original(config, seed: int) -> torch.nn.Module:
    from modeling.titok import TiTok

    torch.manual_seed(seed)
    model = TiTok(config).eval()
    _randomize(model)
    return model


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name and "latent_tokens" not in name and "mask_token" not in name:
                p.normal_(0.0, p[0].numel() ** -0.5)  # fan-in scaled: activations O(1) through every layer
            elif p.ndim >= 2 and name.endswith("embedding.weight"):  # codebooks
                p.normal_()
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def _reference(model, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, N, 1], reconstruction mapped to [-1, 1]) as TiTok's demo computes them. In float64
    the quantizer stays float32 (TiTok forces its lookup to float32) and ``decode_tokens``'s code
    lookup (``get_codebook_entry``: embedding, then l2-normalise when ``use_l2_norm``) runs in float64."""
    with torch.no_grad():
        ids = model.encode(x01)[1]["min_encoding_indices"]  # [B, 1, N]
        if x01.dtype != torch.float64:
            return ids.reshape(ids.shape[0], -1, 1), model.decode_tokens(ids) * 2 - 1
        codes = model.quantize.embedding.weight.double()[ids[:, 0]]  # [B, N, C]
        codes = F.normalize(codes, dim=-1) if model.quantize.use_l2_norm else codes
        return ids.reshape(ids.shape[0], -1, 1), model.decode(codes.transpose(1, 2)[:, :, None]) * 2 - 1


def _decode64(tok64, ids: torch.Tensor) -> torch.Tensor:
    codes = tok64.quantizer.codebook
    codes = F.normalize(codes, dim=-1) if tok64.quantizer.l2_normalize else codes
    with torch.no_grad():
        return tok64.decode_latents(F.embedding(ids[..., 0], codes))


def verify(source: Path, name: str, small: bool, batch: int, hub_format: bool) -> dict:
    config = _config(source, name, small)
    model = _original(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        if hub_format:
            model.save_pretrained(tmp)
            path = Path(tmp) / "model.safetensors"
            tok = convert_titok(load_original_checkpoint(path), load_titok_config(Path(tmp) / "config.json"))
        else:
            path = Path(tmp) / f"tokenizer_{name}.bin"
            torch.save(model.state_dict(), path)
            tok = convert_titok(load_original_checkpoint(path))
    size = config.dataset.preprocessing.crop_size
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref_ids, ref = _reference(model, (x + 1) * 0.5)
    ids = tok.encode(x)
    with torch.no_grad():
        ours = tok.decode(ids)
    row = {"config": f"{name}{' small (64x64, 32 tokens)' if small else ''}", "file": path.name,
           "image": f"{batch}x{size}px", "tokens": list(ids.shape[1:]), "codebook_sizes": tok.codebook_sizes,
           "index_agreement": float((ids == ref_ids).float().mean()), "distinct_codes": int(ids.unique().numel()),
           "max_decode_diff_float32": float((ours - ref).abs().max()), "recon_abs_max": float(ref.abs().max())}
    del ours, ref
    model, tok, x = model.double(), tok.double(), x.double()
    model.quantize.float()
    ref_ids64, ref64 = _reference(model, (x + 1) * 0.5)
    ids64 = tok.encode(x)
    row["index_agreement_float64"] = float((ids64 == ref_ids64).float().mean())
    row["max_decode_diff_float64"] = float((_decode64(tok, ids64) - ref64).abs().max())
    return row


def verify_maskgit_vqgan(batch: int, size: int) -> dict:
    """MaskGIT-VQGAN as TiTok's ``PretrainedTokenizer`` builds it (the proxy-code targets of stage 1)
    against :mod:`imagetok.nets.maskgit_vqgan` with a plain ``vq`` codebook: the same names, no converter."""
    from omegaconf import OmegaConf

    from imagetok import Tokenizer
    from modeling.modules import maskgit_vqgan as original

    conf = OmegaConf.create({"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0, "hidden_channels": 128,
                             "num_channels": 3, "num_res_blocks": 2, "resolution": 256, "z_channels": 256})
    torch.manual_seed(0)
    parts = torch.nn.ModuleDict({"encoder": original.Encoder(conf), "decoder": original.Decoder(conf),
                                 "quantize": original.VectorQuantizer(1024, 256, 0.25)}).eval()
    _randomize(parts)
    net = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256, "unit_interval": True}
    tok = Tokenizer.from_config({"encoder": {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitEncoder", **net},
                                 "decoder": {"_target_": "imagetok.nets.maskgit_vqgan.MaskGitDecoder", **net},
                                 "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "dim": 256,
                                               "codebook_size": 1024}})
    state = {("quantizer.codebook" if k == "quantize.embedding.weight" else k): v for k, v in parts.state_dict().items()}
    for name in ("quant_conv", "post_quant_conv"):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.eye(256)[:, :, None, None], torch.zeros(256)
    tok.load_state_dict(state, strict=False)
    tok.quantizer.initialized.fill_(True)
    tok.eval()
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    row = {"config": "MaskGIT-VQGAN (PretrainedTokenizer's conf)", "image": f"{batch}x{size}px"}
    for dtype in (torch.float32, torch.float64):
        parts, tok, x = parts.to(dtype), tok.to(dtype), x.to(dtype)
        with torch.no_grad():
            _, ref_ids, _ = parts["quantize"](parts["encoder"]((x + 1) * 0.5))  # [B, h*w]
            ref = parts["decoder"](parts["quantize"].get_codebook_entry(ref_ids.reshape(batch, size // 16, -1))) * 2 - 1
            ids = tok.encode(x)
            ours = tok.decode_latents(F.embedding(ids[..., 0], tok.quantizer.codebook).movedim(-1, 1))
        suffix = "" if dtype == torch.float32 else "_float64"
        row[f"tokens{suffix}"] = list(ids.shape[1:])
        row[f"index_agreement{suffix}"] = float((ids.reshape(batch, -1) == ref_ids).float().mean())
        row[f"distinct_codes{suffix}"] = int(ids.unique().numel())
        row[f"max_decode_diff{suffix or '_float32'}"] = float((ours - ref).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--titok", type=Path, default=Path("/tmp/titok_src"), help="1d-tokenizer source tree")
    parser.add_argument("--fast", action="store_true", help="small configurations only")
    parser.add_argument("--only", default=None, help="comma-separated config names (e.g. titok_l32)")
    args = parser.parse_args()
    if not (args.titok / "modeling" / "titok.py").is_file():
        print(f"skipped: no 1d-tokenizer source at {args.titok} (see the docstring)")
        return
    sys.path.insert(0, str(args.titok))
    _stub_accelerate()
    cases = [("titok_s128", True, 2, False), ("titok_s128", True, 2, True), ("titok_sl256_vq8k", True, 2, False)]
    if not args.fast:
        cases += [("titok_s128", False, 1, True), ("titok_bl64_vq8k", False, 1, False), ("titok_l32", False, 1, False)]
    for name, small, batch, hub in cases:
        if args.only is None or name in args.only.split(","):
            print(json.dumps(verify(args.titok, name, small, batch, hub)), flush=True)
    if args.only is None or "maskgit_vqgan" in args.only.split(","):
        print(json.dumps(verify_maskgit_vqgan(batch=2, size=64)), flush=True)


if __name__ == "__main__":
    main()
