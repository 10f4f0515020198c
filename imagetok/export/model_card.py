"""The model card (``README.md``) written beside an exported tokenizer: what it is, what it was trained
on and for how long, its numbers, and the licences of third-party weights used to train it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from imagetok.errors import ConfigValueError
from imagetok.tokenizer import Tokenizer

LICENCES = {
    "lpips": "LPIPS linear calibration layers (lpips package, BSD-2-Clause) on torchvision's ImageNet VGG16 "
             "(BSD-3-Clause code; weights trained on ImageNet, whose terms restrict use to non-commercial research)",
    "inception": "FID Inception v3 weights ported from TensorFlow by torch-fidelity (Apache-2.0)",
    "resnet50": "torchvision ResNet-50 ImageNet weights (BSD-3-Clause code; weights trained on ImageNet, whose "
                "terms restrict use to non-commercial research)",
    "vit_b_16": "torchvision ViT-B/16 ImageNet weights (BSD-3-Clause code; weights trained on ImageNet, whose "
                "terms restrict use to non-commercial research)",
}


def third_party_weights(run_config: dict[str, Any], lpips_used: bool | None) -> list[str]:
    """Licence lines for the pretrained weights a run's losses used: LPIPS's VGG16 (``lpips_used``
    from the run's logs; None = unknown, decided by the config) and torchvision semantic teachers."""
    loss = run_config.get("loss") or {}
    lines = []
    if lpips_used or (lpips_used is None and loss and loss.get("perceptual_weight") != 0
                      and not loss.get("perceptual_random_backbone")):
        lines.append(f"- {LICENCES['lpips']} (perceptual loss"
                     + (")" if lpips_used else ", if the weights were present during training)"))
    teacher = ((loss.get("semantic") or {}).get("teacher") or {})
    if teacher.get("arch") in LICENCES:
        lines.append(f"- {LICENCES[teacher['arch']]} (frozen teacher of the semantic alignment loss)")
    for backbone, role in (((loss.get("discriminator") or {}).get("backbone"), "frozen backbone of the DINO discriminator"),
                           ((loss.get("repa") or {}).get("teacher"), "frozen teacher of the REPA decoder alignment")):
        if backbone and not backbone.get("random_backbone"):
            from imagetok.nets.foundation import hf_repo

            model = backbone.get("model", "vit_small_patch14_dinov2")
            lines.append(f"- DINOv2 weights {hf_repo(model)} (Oquab et al. 2023; Apache-2.0) ({role})")
    return lines


def lpips_used_in_run(checkpoint: Path) -> bool | None:
    """Whether the run logged a perceptual term (``<run>/logs/metrics.csv`` header), None without logs."""
    log = checkpoint.parent.parent / "logs" / "metrics.csv"
    if not log.is_file():
        return None
    with open(log) as handle:
        return "train/perceptual" in handle.readline().split(",")


def _count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def model_card(tokenizer: Tokenizer, run_config: dict[str, Any], steps: int | None,
               metrics: dict[str, Any] | None, weights: str, source: str, lpips_used: bool | None = None) -> str:
    """Markdown text; ``run_config`` is the training run's resolved config (may be empty)."""
    data = run_config.get("data", {})
    scales = getattr(tokenizer.quantizer, "scales", None)  # a multi-scale tokenizer takes one image size only
    size = int(data.get("image_size", scales[-1] * tokenizer.downsample_factor if scales else 256))
    token_shape = tokenizer.token_shape(size)  # (h, w, K), or (L, 1) for multi-scale tokens
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
        f"| downsampling | {tokenizer.downsample_factor}x: a {size}x{size} image -> {'x'.join(map(str, token_shape))} tokens ({math.prod(token_shape)} per image) |",
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
    lines += ["## Licences of third-party weights used in training", ""]
    lines += third_party_weights(run_config, lpips_used) or ["- none known (the source project's own licence applies)"
                                                              if not run_config else "- none"]
    return "\n".join(lines) + "\n"


def run_metrics(checkpoint: Path, evaluation: str | None) -> dict[str, Any] | None:
    """Numbers for the card: an evaluate.py ``metrics.json`` when given, else the training run's last
    validation (``<run>/metrics.json`` next to ``checkpoints/``)."""
    if evaluation:
        if not Path(evaluation).is_file():
            raise ConfigValueError("evaluation", evaluation, "the metrics.json that evaluate.py wrote, or null")
        data = json.loads(Path(evaluation).read_text())
        numbers = {k: data[k] for k in ("fid", "psnr", "ssim", "lpips", "codebook_usage", "num_images") if k in data}
        protocol = data.get("protocol") or {}
        for key in ("evaluation_split", "fid_reference", "weights"):
            if protocol.get(key):
                numbers[f"protocol: {key}"] = protocol[key]
        return numbers
    summary = checkpoint.parent.parent / "metrics.json"
    if summary.is_file():
        last = json.loads(summary.read_text()).get("last_validation")
        return {f"held-out {k} at step {last['step']} (training validation)": v
                for k, v in (last or {}).items() if k != "step"} or None
    return None
