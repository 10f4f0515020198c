"""The model card (``README.md``) written beside an exported tokenizer: what it is, what it was trained
on and for how long, its numbers, and the licences of third-party weights used to train it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imagetok.tokenizer import Tokenizer

LICENCES = {
    "lpips": "LPIPS linear calibration layers (lpips package, BSD-2-Clause) on torchvision's ImageNet VGG16 "
             "(BSD-3-Clause code; weights trained on ImageNet, whose terms restrict use to non-commercial research)",
    "inception": "FID Inception v3 weights ported from TensorFlow by torch-fidelity (Apache-2.0)",
}


def _count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def model_card(tokenizer: Tokenizer, run_config: dict[str, Any], steps: int | None,
               metrics: dict[str, Any] | None, weights: str, source: str) -> str:
    """Markdown text; ``run_config`` is the training run's resolved config (may be empty)."""
    data = run_config.get("data", {})
    size = int(data.get("image_size", 256))
    h, w, k = tokenizer.token_shape(size)
    target = lambda part: tokenizer.config[part]["_target_"].rsplit(".", 1)[-1] if tokenizer.config else "?"  # noqa: E731
    lines = [
        "---", "library_name: imagetok", "tags: [image-tokenizer, vector-quantization]", "---", "",
        f"# imagetok tokenizer ({target('quantizer')})", "",
        "```python", "from imagetok import Tokenizer", "tok = Tokenizer.from_pretrained(\"<this directory or hub id>\")",
        "ids = tok.encode(tok.preprocess(pil_images))   # LongTensor [B, h, w, K]",
        "images = tok.to_pil(tok.decode(ids))", "```", "",
        "## Architecture", "",
        "| | |", "|---|---|",
        f"| encoder | {target('encoder')}, {_count(tokenizer.encoder):.2f}M parameters |",
        f"| quantizer | {target('quantizer')}, codebook sizes {tokenizer.codebook_sizes} |",
        f"| decoder | {target('decoder')}, {_count(tokenizer.decoder):.2f}M parameters |",
        f"| total | {_count(tokenizer):.2f}M parameters |",
        f"| downsampling | {tokenizer.downsample_factor}x: a {size}x{size} image -> {h}x{w}x{k} tokens ({h * w * k} per image) |",
        "| image values | float [-1, 1], `[B, 3, H, W]` (`tok.preprocess` converts PIL / uint8) |", "",
        "## Training", "",
        f"- data: `{data.get('_target_', 'unknown')}`"
        + (f", root `{data['root']}`" if data.get("root") else "")
        + (f", photographs {data['train_photos']}" if data.get("train_photos") else "") + f", {size}px crops",
        f"- generator steps: {steps if steps is not None else 'unknown'}; batch {data.get('batch_size', '?')} per device",
        f"- exported weights: {weights} ({source})", "",
    ]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    loss = run_config.get("loss", {})
    used = ["lpips"] if loss and loss.get("perceptual_weight") != 0 else []
    lines += ["## Licences of third-party weights used in training", ""]
    lines += [f"- {LICENCES[u]} (perceptual loss, when the weights were present)" for u in used] or ["- none"]
    return "\n".join(lines) + "\n"


def run_metrics(checkpoint: Path, evaluation: str | None) -> dict[str, Any] | None:
    """Numbers for the card: an evaluate.py ``metrics.json`` when given, else the training run's last
    validation (``<run>/metrics.json`` next to ``checkpoints/``)."""
    if evaluation:
        data = json.loads(Path(evaluation).read_text())
        return {k: data[k] for k in ("fid", "psnr", "ssim", "lpips", "codebook_usage", "num_images") if k in data}
    summary = checkpoint.parent.parent / "metrics.json"
    if summary.is_file():
        last = json.loads(summary.read_text()).get("last_validation")
        return {f"held-out {k} at step {last['step']} (training validation)": v
                for k, v in (last or {}).items() if k != "step"} or None
    return None
