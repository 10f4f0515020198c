"""Do a 1D latent-token tokenizer's tokens carry the image? Measurements on a trained checkpoint (issue 15).

    python benchmarks/oned_diagnosis.py outputs/<run>/checkpoints/last.ckpt [--weights ema|raw]
                                        [--num-images 256] [--threads 1]

Prints one JSON object, on held-out validation crops of the checkpoint's data config (the sample
data's validation photographs are never trained on):

- ``psnr``: decoding the true tokens, the tokens of another image (``shuffled``: the batch rolled by
  one), one image's tokens for every image (``constant``) and all-zero quantized latents (``zero``), at
  every prefix length ``k`` for a variable-length tokenizer. ``true`` close to ``shuffled`` means the
  decoder ignores its tokens. ``mean_colour``: the PSNR of each crop's own mean colour, the figure a
  tokenizer that transmits only the average colour reaches.
- ``latents``: per latent token, the share of the pre-quantization latent's energy that varies across
  images (``1 - |mean|^2 / mean |z|^2``; 0 = the same latent for every image), how much the tokens
  repeat each other (``token_redundancy``: mean cosine between two tokens' deviations from their
  means, 1 = copies), and the distinct codes each position takes; codebook usage and the quantizer input's scale.
- ``attention``: per layer, the attention mass from latent-token queries to patch keys in the encoder
  (and how far from uniform over patches it is: entropy / log P, 1 = uniform), and from patch queries
  to latent-token keys in the decoder (against ``k / (P + k)``, what uniform attention would give).

PSNR is the mean over images of per-image PSNR on [0, 1] (as ``evaluate.py``, without uint8 rounding).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from einops import rearrange

from imagetok import Tokenizer
from imagetok.nets.transformer import Attention, apply_rotary


def held_out_images(checkpoint: str, num_images: int) -> torch.Tensor:
    """Validation crops ``[num_images, 3, S, S]`` in [-1, 1] from the checkpoint's own data config."""
    from hydra.utils import instantiate

    from imagetok.export.checkpoint import read_checkpoint

    saved = read_checkpoint(checkpoint)  # weights_only=True: a checkpoint file runs no code
    data = dict(saved["hyper_parameters"]["config"]["data"])
    data["val_samples"] = num_images
    dataset = instantiate(data).val_dataset()
    return torch.stack([dataset[i] for i in range(num_images)])


def psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    """Mean over images of per-image PSNR on [0, 1]; both ``[B, 3, H, W]`` in [-1, 1]."""
    mse = ((recon.clamp(-1, 1) - images) / 2).square().flatten(1).mean(1)
    return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def decode_controls(tok: Tokenizer, images: torch.Tensor, ks: list[int]) -> dict[str, dict[str, float]]:
    """PSNR of decoding true / shuffled / constant / zero latents, for each prefix length in ``ks``."""
    z_q = tok.quantize(images).z_q  # [B, N, C]
    out: dict[str, dict[str, float]] = {name: {} for name in ("true", "shuffled", "constant", "zero")}
    for k in ks:
        prefix = z_q[:, :k]
        variants = {"true": prefix, "shuffled": prefix.roll(1, dims=0),
                    "constant": prefix[:1].expand_as(prefix), "zero": torch.zeros_like(prefix)}
        for name, latents in variants.items():
            out[name][str(k)] = round(psnr(tok.decode_latents(latents), images), 2)
    mean_colour = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    out["mean_colour"] = round(psnr(mean_colour, images), 2)
    out["dataset_mean"] = round(psnr(images.mean(0, keepdim=True).expand_as(images), images), 2)
    return out


@torch.no_grad()
def latent_statistics(tok: Tokenizer, images: torch.Tensor) -> dict[str, object]:
    """Input dependence of each latent token before quantization, codes per position, codebook usage."""
    z = tok.quant_conv(tok.encoder(images))  # [B, N, dim]: what the quantizer receives
    energy = z.square().sum(-1).mean(0)  # [N]
    varying = 1 - z.mean(0).square().sum(-1) / energy.clamp_min(1e-12)
    # redundancy: cosine between two tokens' deviations from their across-image means, averaged over
    # images and token pairs (1 = every token says the same about the image)
    dev = torch.nn.functional.normalize(z - z.mean(0), dim=-1)  # [B, N, dim]
    n = z.shape[1]
    cos = (dev @ dev.transpose(1, 2)).mean(0)  # [N, N]
    redundancy = float((cos.sum() - cos.diagonal().sum()) / max(1, n * (n - 1)))
    ids = tok.quantize(images).indices[..., 0]  # [B, N]
    distinct = [int(ids[:, n].unique().numel()) for n in range(ids.shape[1])]
    size = tok.codebook_sizes[0]
    stats: dict[str, object] = {
        "varying_share_per_token": [round(float(v), 3) for v in varying],
        "distinct_codes_per_token": distinct,
        "token_redundancy": round(redundancy, 3),
        "codebook_usage": round(ids.unique().numel() / size, 4), "codebook_size": size,
        "quantizer_input_rms": round(float(z.square().mean().sqrt()), 4),
    }
    codebook = getattr(tok.quantizer, "codebook", None)
    if callable(getattr(tok.quantizer, "codes", None)):
        codebook = tok.quantizer.codes()
    if isinstance(codebook, torch.Tensor):
        stats["codebook_rms"] = round(float(codebook.float().square().mean().sqrt()), 4)
    return stats


class AttentionRecorder:
    """Forward hooks on every :class:`Attention` of a net that recompute its attention probabilities
    ``[B, heads, L, L]`` from the hooked input (so the net itself runs unchanged)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.maps: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in net.modules() if isinstance(m, Attention)]

    def _hook(self, module: Attention, args: tuple, _output) -> None:
        x, rope, mask = (list(args) + [None, None])[:3]
        q, k, _ = rearrange(module.qkv(x), "b l (three h d) -> three b h l d", three=3, h=module.num_heads)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        self.maps.append(logits.softmax(-1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def attention_statistics(tok: Tokenizer, images: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: encoder latent->patch mass and its entropy over patches; decoder patch->latent mass."""
    patches = (images.shape[-1] // tok.encoder.downsample_factor) ** 2  # patches, or a hybrid's grid cells
    recorder = AttentionRecorder(tok.encoder)
    z_q = tok.quantize(images).z_q
    recorder.remove()
    to_patches, entropy = [], []
    for probs in recorder.maps:  # [B, h, P + N, P + N]
        rows = probs[:, :, patches:]  # latent-token queries
        mass = rows[..., :patches].sum(-1)
        to_patches.append(round(float(mass.mean()), 3))
        over_patches = rows[..., :patches] / mass[..., None].clamp_min(1e-12)
        h = -(over_patches * over_patches.clamp_min(1e-12).log()).sum(-1) / math.log(patches)
        entropy.append(round(float(h.mean()), 3))
    recorder = AttentionRecorder(tok.decoder)
    tok.decode_latents(z_q)
    recorder.remove()
    n = z_q.shape[1]
    to_latents = [round(float(p[:, :, :patches, patches:].sum(-1).mean()), 3) for p in recorder.maps]
    return {"encoder_latent_to_patch_mass": to_patches, "encoder_latent_over_patch_entropy": entropy,
            "decoder_patch_to_latent_mass": to_latents, "decoder_uniform_mass": round(n / (patches + n), 3)}


def diagnose(tok: Tokenizer, images: torch.Tensor) -> dict[str, object]:
    n = tok.encoder.num_latent_tokens
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n] + ([n] if n & (n - 1) else [])
    ks = ks if tok.variable_length else [n]
    return {"num_images": images.shape[0], "num_latent_tokens": n, "psnr": decode_controls(tok, images, ks),
            "latents": latent_statistics(tok, images), "attention": attention_statistics(tok, images[:64])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_checkpoint(args.checkpoint, weights=args.weights)
    result = {"checkpoint": args.checkpoint, "weights": args.weights,
              **diagnose(tok, held_out_images(args.checkpoint, args.num_images))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
