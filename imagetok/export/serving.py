"""``torch.export`` programs of ``encode`` and ``decode`` for serving without the imagetok package:
``encode.pt2`` maps float images ``[B, 3, H, W]`` in [-1, 1] to int64 indices ``[B, *token_shape]`` (``[B, h, w, K]``, or ``[B, N, K]`` for 1D tokens) and
``decode.pt2`` maps indices back to images in about [-1, 1]. Shapes are fixed to the example batch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imagetok.tokenizer import Tokenizer


class _Encode(nn.Module):
    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.quantize(images).indices


class _Decode(nn.Module):
    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_latents(self.tokenizer.indices_to_latents(indices))


def export_programs(tokenizer: Tokenizer, example_images: torch.Tensor) -> dict[str, torch.export.ExportedProgram]:
    """Export ``encode`` and ``decode`` (eval mode, no gradients) traced with ``example_images``."""
    tokenizer = tokenizer.eval()
    with torch.no_grad():
        indices = tokenizer.encode(example_images)
        return {"encode": torch.export.export(_Encode(tokenizer), (example_images,)),
                "decode": torch.export.export(_Decode(tokenizer), (indices,))}


def save_programs(tokenizer: Tokenizer, example_images: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Write ``encode.pt2`` and ``decode.pt2`` into ``out_dir``; load with ``torch.export.load(path).module()``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, program in export_programs(tokenizer, example_images).items():
        path = out_dir / f"{name}.pt2"
        torch.export.save(program, path)
        paths.append(path)
    return paths
