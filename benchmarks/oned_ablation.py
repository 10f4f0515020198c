"""Short controlled trainings of a 1D tokenizer recipe, then :mod:`oned_diagnosis`'s measurements (issue 15).

    python benchmarks/oned_ablation.py --recipe cpu_flextok --steps 300 [--continuous] [--lr 1e-3]
                                       [--warmup 50] [--seed 0] [--threads 1] [override ...]

A plain loop, not ``train.py``: L1 reconstruction plus the quantizer's own loss, AdamW with the
recipe's betas, linear warm-up then cosine decay, gradient clipping at 1, no GAN, no LPIPS, no EMA,
so what it shows belongs to the architecture, the quantizer and the optimiser alone. ``--continuous``
swaps the quantizer for a pass-through (same projections, no rounding): the same bottleneck width
without quantization, which tells the quantizer's share of a failure from the architecture's.
Trailing arguments are Hydra overrides of the recipe (``encoder.num_latent_tokens=16`` ...). Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oned_diagnosis import diagnose

from imagetok.quantizers.base import QuantizerOutput
from imagetok.training.schedule import lr_lambda


class PassThrough(nn.Module):
    """A continuous bottleneck in the quantizer's place: ``z_q = z`` ``[B, N, dim]``, index 0 everywhere."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = self.out_dim = dim
        self.codebook_sizes = [1]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        return QuantizerOutput(z_q=z, indices=z.new_zeros(*z.shape[:-1], 1, dtype=torch.long),
                               loss=z.new_zeros(()), metrics={})


def compose(recipe: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    configs = Path(__file__).resolve().parents[1] / "imagetok" / "configs"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
        return hydra_compose("train", overrides=[f"experiment={recipe}", *overrides])


def train_plain(cfg, steps: int, lr: float, warmup: int, continuous: bool, position_scale: float = 1.0,
                identity_scale: float = 1.0):
    """The tokenizer of ``cfg`` trained ``steps`` steps as the module docstring says; eval mode."""
    from hydra.utils import instantiate

    from imagetok import Tokenizer
    from imagetok.training.run import tokenizer_config

    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_config(tokenizer_config(cfg))
    with torch.no_grad():  # scale the encoder's learned patch-position table (1 = as initialised)
        for name, p in tok.named_parameters():
            if name.endswith("encoder.positions.learned.weight"):
                p.mul_(position_scale)
            if name.endswith(("encoder.latent_tokens", "decoder.latent_positions")):
                p.mul_(identity_scale)
    if continuous:
        tok.quantizer = PassThrough(tok.quantizer.dim)
        tok.post_quant_conv = nn.Linear(tok.quantizer.dim, tok.decoder.z_channels)
    data = instantiate(cfg.data)
    loader = iter(data.train_dataloader())
    optim = torch.optim.AdamW(tok.parameters(), lr=lr, betas=tuple(cfg.optim.betas), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda("cosine", warmup, steps, 0.1))
    tok.train()
    for _ in range(steps):
        images = next(loader)
        images = images[0] if isinstance(images, (list, tuple)) else images
        recon, out = tok(images)
        loss = (recon - images).abs().mean() + out.loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        optim.step()
        sched.step()
    return tok.eval(), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cpu_flextok")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's optim.lr")
    parser.add_argument("--warmup", type=int, default=None, help="default: the recipe's optim.warmup_steps")
    parser.add_argument("--continuous", action="store_true")
    parser.add_argument("--position-scale", type=float, default=1.0,
                        help="multiply the encoder's learned patch-position table after initialisation")
    parser.add_argument("--identity-scale", type=float, default=1.0,
                        help="multiply the learned latent tokens (encoder) and latent positions (decoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-images", type=int, default=256)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    cfg = compose(args.recipe, [f"seed={args.seed}", *overrides])
    lr = args.lr if args.lr is not None else float(cfg.optim.lr)
    warmup = args.warmup if args.warmup is not None else int(cfg.optim.warmup_steps)
    start = time.perf_counter()
    tok, data = train_plain(cfg, args.steps, lr, warmup, args.continuous, args.position_scale,
                             args.identity_scale)
    seconds = time.perf_counter() - start
    data.val_samples = args.num_images
    dataset = data.val_dataset()
    images = torch.stack([dataset[i] for i in range(args.num_images)])
    result = {"recipe": args.recipe, "overrides": overrides, "steps": args.steps, "lr": lr, "warmup": warmup,
              "continuous": args.continuous, "position_scale": args.position_scale,
              "identity_scale": args.identity_scale, "seed": args.seed, "train_seconds": round(seconds, 1),
              **diagnose(tok, images)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
