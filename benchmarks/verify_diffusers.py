"""Check ``from=diffusers`` against diffusers' own ``VQModel`` (``pip install diffusers``).

    python benchmarks/verify_diffusers.py [--fast] [--size 128] [--batch 2]

For each configuration (aMUSEd's VQ-GAN and Kandinsky's MoVQ as published, and small variants) a
``diffusers.VQModel`` is built with seeded random weights (every norm and bias perturbed, the codebook
drawn from the model's own latents so that codes are used as in a trained model), saved with
``save_pretrained`` exactly as released (``config.json`` + ``diffusion_pytorch_model.safetensors``), and
that directory is converted as ``python export.py from=auto checkpoint=<dir>`` does. The published
ones sit in a pipeline directory as on the Hub (``model_index.json`` + ``vqvae/`` or ``movq/``), so the
converter picks aMUSEd's [0, 1] pixel range itself; diffusers is fed the images in that range and its
output mapped back to [-1, 1] for the comparison (Tokenizer.encode/decode take and give [-1, 1]). Both then encode the
same random images: diffusers' ``encode`` -> ``quantize`` indices against ``Tokenizer.encode``, and
diffusers' ``decode`` of its own codes (``force_not_quantize=True``; indices when
``lookup_from_codebook``) against ``Tokenizer.decode`` of the same indices, in float32 and with both
models in float64 (imagetok's quantizer looks codes up in float32 by design, so the float64 decode
takes the codebook rows of those indices in float64 and runs ``decode_latents``).

Printed, one JSON line per configuration. diffusers is imported at run time only; without it this
prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from imagetok.export.converters import convert_checkpoint, detect_format, load_original_checkpoint

# aMUSEd's VQ-GAN (amused/amused-256 and -512, subfolder vqvae): diffusers' scripts/convert_amused.py and
# the Hub config.json (which adds force_upcast and scaling_factor)
AMUSED = {"act_fn": "silu", "block_out_channels": [128, 256, 256, 512, 768],
          "down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
          "in_channels": 3, "out_channels": 3, "latent_channels": 64, "layers_per_block": 2, "norm_num_groups": 32,
          "num_vq_embeddings": 8192, "sample_size": 32, "vq_embed_dim": None, "mid_block_add_attention": False,
          "lookup_from_codebook": True, "force_upcast": True, "scaling_factor": 0.18215, "norm_type": "group"}
# Kandinsky 2.2 / 3's MoVQ (kandinsky-community/kandinsky-2-2-decoder, subfolder movq): MOVQ_CONFIG of
# diffusers' scripts/convert_kandinsky_to_diffusers.py
MOVQ = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        "num_vq_embeddings": 16384, "block_out_channels": [128, 256, 256, 512], "vq_embed_dim": 4,
        "layers_per_block": 2, "norm_type": "spatial"}
SMALL_GROUP = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
               "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], "layers_per_block": 1,
               "latent_channels": 6, "vq_embed_dim": 8, "num_vq_embeddings": 256, "norm_num_groups": 8}
SMALL_SPATIAL = {"block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 2 + ["AttnDownEncoderBlock2D"],
                 "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                 "latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 512, "norm_type": "spatial"}
# name -> (VQModel config, the pipeline it is published in: its model_index.json _class_name and subfolder)
CONFIGS = {"small group norm (2 levels, attention, 8 groups)": (SMALL_GROUP, None),
           "small spatial norm (3 levels, attention)": (SMALL_SPATIAL, None),
           "aMUSEd VQ-GAN (amused-256/512 vqvae)": (AMUSED, ("AmusedPipeline", "vqvae")),
           "MoVQ (Kandinsky 2.2/3 movq)": (MOVQ, ("KandinskyV22Pipeline", "movq"))}
# the image range each pipeline feeds its VQModel (aMUSEd: VaeImageProcessor(do_normalize=False), decode clipped to [0, 1])
PIXEL_RANGE = {"AmusedPipeline": (0.0, 1.0)}


@torch.no_grad()
def _randomize(model: torch.nn.Module, images: torch.Tensor, seed: int) -> None:
    """Seeded random weights: convs keep their default init, norms and biases are perturbed, the codebook
    is drawn from the model's latents of ``images`` (plus noise), as a trained codebook covers them."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.05 * noise)
        elif "conv_y" in name or "conv_b" in name:
            p.mul_(0.5)
    latents = model.encode(images).latents.permute(0, 2, 3, 1).reshape(-1, model.config.vq_embed_dim or model.config.latent_channels)
    pick = torch.randint(0, latents.shape[0], (model.config.num_vq_embeddings,), generator=gen)
    codebook = latents[pick] + 0.1 * latents.std() * torch.randn(pick.shape[0], latents.shape[1], generator=gen)
    model.quantize.embedding.weight.copy_(codebook)


def _diffusers_codes(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices ``[B, h, w]``, decoded images) as ``VQModel`` computes them."""
    h = model.encode(images).latents
    _, _, (_, _, flat) = model.quantize(h)
    b, c, hh, ww = h.shape
    if model.config.lookup_from_codebook:
        decoded = model.decode(flat, force_not_quantize=True, shape=(b, hh, ww, c)).sample
    else:
        decoded = model.decode(model.quantize.get_codebook_entry(flat, (b, hh, ww, c)), force_not_quantize=True).sample
    return flat.reshape(b, hh, ww), decoded


@torch.no_grad()
def verify(name: str, config: dict, pipeline: tuple[str, str] | None, size: int, batch: int, seed: int = 0) -> dict:
    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(**config).eval()
    low, high = PIXEL_RANGE.get(pipeline[0] if pipeline else "", (-1.0, 1.0))
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1  # imagetok's [-1, 1]
    _randomize(model, torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 2)) * (high - low) + low, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        if pipeline:  # as on the Hub: <repo>/model_index.json and the VQModel in its subfolder
            (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline[0], pipeline[1]: ["diffusers", "VQModel"]}))
            path = path / pipeline[1]
        model.save_pretrained(path)
        checkpoint = load_original_checkpoint(path)
        found = detect_format(checkpoint, path, checkpoint_path=path).name
        tok = convert_checkpoint(found, checkpoint, path, checkpoint_path=path)
        files = sorted(p.name for p in path.iterdir())
    row = {"configuration": name, "detected": found, "files": files, "images": f"{batch}x{size}px",
           "pixel_range": tok.config["encoder"].get("pixel_range", [-1.0, 1.0])}
    for dtype in (torch.float32, torch.float64):
        model.to(dtype), tok.to(dtype)
        x = images.to(dtype)
        # diffusers sees the images in its pipeline's range, and its decode is compared back in ours
        ref_idx, ref_img = _diffusers_codes(model, low + (x + 1) * ((high - low) / 2))
        ref_img = (ref_img - low) * (2 / (high - low)) - 1
        idx = tok.encode(x)
        if dtype == torch.float32:
            ours = tok.decode(ref_idx[..., None])
        else:  # imagetok's code lookup is float32 by design: look the codes up in float64 here
            ours = tok.decode_latents(tok.quantizer.codebook[ref_idx].permute(0, 3, 1, 2))
        suffix = "" if dtype == torch.float32 else "_float64"
        row[f"index_agreement{suffix}"] = (idx[..., 0] == ref_idx).float().mean().item()
        row[f"max_decode_diff{suffix}"] = (ours - ref_img).abs().max().item()
        if dtype == torch.float32:
            row["tokens"] = f"{'x'.join(map(str, idx.shape[1:]))} of {tok.codebook_sizes[0]}"
            row["codes_used"] = int(ref_idx.unique().numel())
            row["decode_range"] = [round(ref_img.min().item(), 2), round(ref_img.max().item(), 2)]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="the small configurations only")
    parser.add_argument("--size", type=int, default=128, help="image side (the published nets at 256 take minutes on 2 cores)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    try:
        import diffusers
    except ImportError:
        print("skipped: diffusers is not installed (pip install diffusers)")
        return
    diffusers.utils.logging.set_verbosity_error()  # its float32-modules notice on every .to(dtype)
    print(json.dumps({"diffusers": diffusers.__version__, "torch": torch.__version__}), flush=True)
    for name, (config, pipeline) in CONFIGS.items():
        if args.fast and not name.startswith("small"):
            continue
        size = 64 if name.startswith("small") else args.size
        print(json.dumps(verify(name, config, pipeline, size, args.batch)), flush=True)


if __name__ == "__main__":
    main()
