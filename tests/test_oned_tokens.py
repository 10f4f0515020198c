"""1D latent tokens carry the image (issue 15): a briefly trained variable-length 1D tokenizer decodes
its own tokens better than another image's (a decoder that ignored its input would score the same).
``benchmarks/oned_diagnosis.py`` makes the same control, and more, on a trained checkpoint."""

from __future__ import annotations

import torch

from imagetok import Tokenizer
from imagetok.data.sample import SampleDataModule
from imagetok.nets.latent_tokens import LatentTokenDecoder, LatentTokenEncoder
from imagetok.quantizers.fsq import FiniteScalarQuantizer

NET = {"patch_size": 4, "width": 64, "depth": 2, "num_heads": 2, "resolution": 16, "num_latent_tokens": 8, "z_channels": 8}


def _tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer(LatentTokenEncoder(**NET, causal=True),
                     FiniteScalarQuantizer(dim=4, levels=[8, 5, 5, 5]),
                     LatentTokenDecoder(**NET, token_drop="pow2"))


def _psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    mse = ((recon.clamp(-1, 1) - images) / 2).square().flatten(1).mean(1)
    return float((-10 * torch.log10(mse)).mean())


def _crops(split: str, n: int, seed: int = 0) -> torch.Tensor:
    data = SampleDataModule(image_size=16, batch_size=n, val_samples=n, seed=seed)
    dataset = data.val_dataset() if split == "val" else data.train_dataset()
    return torch.stack([dataset[i] for i in range(n)])


def test_shuffled_tokens_decode_worse_than_the_true_ones_after_short_training(one_thread):
    torch.manual_seed(0)
    tok = _tokenizer()
    data = SampleDataModule(image_size=16, batch_size=32, seed=0)
    batches = iter(data.train_dataloader())
    optim = torch.optim.AdamW(tok.parameters(), lr=2e-3, betas=(0.9, 0.99))
    for _ in range(150):
        images = next(batches)
        recon, out = tok(images)
        loss = (recon - images).abs().mean() + out.loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    tok.eval()
    images = _crops("val", 64)  # held-out photographs
    with torch.no_grad():
        z_q = tok.quantize(images).z_q
        true = _psnr(tok.decode_latents(z_q), images)
        shuffled = _psnr(tok.decode_latents(z_q.roll(1, dims=0)), images)
    assert true > shuffled + 1.0, (true, shuffled)
