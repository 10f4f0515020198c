"""Samples of the probe, decoded to images by the shards' tokenizer, and their gFID against the
shards' source images (FID Inception and Fréchet distance of ``imagetok/evaluation``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from imagetok.errors import CheckpointError
from imagetok.probe.gpt import ProbeGPT
from imagetok.probe.layout import TokenLayout
from imagetok.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_shard_tokenizer(index: dict[str, Any], override: str | None = None) -> Tokenizer:
    """The tokenizer that wrote the shards: ``override`` or index.json's ``pretrained`` (a
    ``save_pretrained`` directory or Hub id), checked against index.json's ``tokenizer_sha256``. Any
    failure is one :class:`CheckpointError` line naming the path and the key that overrides it."""
    from imagetok.tokenize_dataset import tokenizer_identity

    where = override or index.get("pretrained")
    try:
        tokenizer = Tokenizer.from_pretrained(where)
    except Exception as err:  # missing directory, not ours, corrupt weights: all say the same thing here
        raise CheckpointError(f"the shards' tokenizer does not load from {where!r} (index.json 'pretrained'; "
                              f"pretrained=<dir> overrides it): {str(err).splitlines()[0]}") from None
    if tokenizer_identity(tokenizer) != index.get("tokenizer_sha256"):
        raise CheckpointError(f"the tokenizer at {where!r} is not the one that wrote the shards (its sha256 differs "
                              "from index.json's tokenizer_sha256); pretrained=<dir> names the right one")
    return tokenizer


def sample_start_ids(model: ProbeGPT, count: int) -> torch.Tensor:
    """Start-token ids of ``count`` samples: classes ``0, 1, ..., C-1, 0, ...`` for a class-conditional
    probe, the unconditional start token otherwise. LongTensor ``[count]``."""
    if model.num_classes:
        return torch.arange(count) % model.num_classes
    return torch.full((count,), model.null_class, dtype=torch.long)


@torch.no_grad()
def sample_tokens(model: ProbeGPT, layout: TokenLayout, count: int, *, batch_size: int, temperature: float,
                  top_k: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` token maps ``[count, *token_shape]`` (LongTensor, on CPU) and their start ids ``[count]``,
    drawn in batches of ``batch_size`` with a generator seeded by ``seed`` (a progress bar counts samples)."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    starts = sample_start_ids(model, count)
    out = []
    with tqdm(total=count, desc="samples", unit="img") as bar:
        for first in range(0, count, batch_size):
            start = starts[first : first + batch_size].to(device)
            out.append(layout.from_sequence(model.sample(start, temperature, top_k, generator)).cpu())
            bar.update(start.shape[0])
    return torch.cat(out), starts


@torch.no_grad()
def decode(tokenizer: Tokenizer, tokens: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Token maps ``[N, *token_shape]`` -> images ``[N, 3, H, W]`` in [-1, 1] (clamped), on CPU."""
    tokenizer = tokenizer.to(device).eval()
    return torch.cat([tokenizer.decode(tokens[i : i + batch_size].to(device)).clamp(-1, 1).cpu()
                      for i in range(0, tokens.shape[0], batch_size)])


def save_sample_grid(images: torch.Tensor, path: Path, min_tile: int = 64) -> None:
    """Images ``[N, 3, H, W]`` in [-1, 1] as one PNG grid (8 per row), small images enlarged by an
    integer factor (nearest neighbour, every pixel exact) to at least ``min_tile`` pixels."""
    images = images.float().add(1).div(2)
    scale = max(1, min_tile // images.shape[-2])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(make_grid(images, nrow=min(8, images.shape[0]), padding=2, pad_value=1.0), path)


def generation_fid(images: torch.Tensor, index: dict[str, Any], fid_cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """gFID of ``images`` ``[N, 3, H, W]`` ([-1, 1]) against the shards' source images: the split that
    index.json's ``data`` config and ``split`` name, its first ``num_images`` (those the shards hold),
    at most ``fid_cfg["num_reference"]`` of them. Returns ``{"gfid", "num_samples", "num_reference",
    "inception", "feature_layer"}``."""
    from imagetok.data.inference import InferenceImages
    from imagetok.evaluation.fid import FeatureStatistics, frechet_distance
    from imagetok.evaluation.inception import InceptionFeatures
    from imagetok.training.run import instantiate_part
    from omegaconf import OmegaConf

    inception = InceptionFeatures(str(fid_cfg["feature_layer"]), fid_cfg.get("inception_weights"),
                                  bool(fid_cfg.get("random_weights"))).to(device)
    datamodule = instantiate_part(OmegaConf.create(index["data"]), "data")
    source = datamodule.train_dataset() if index.get("split", "train") == "train" else datamodule.val_dataset()
    limit = int(index["num_images"])
    if fid_cfg.get("num_reference"):
        limit = min(limit, int(fid_cfg["num_reference"]))
    real, fake = FeatureStatistics(inception.dim), FeatureStatistics(inception.dim)
    batch = int(fid_cfg.get("batch_size", 32))
    for originals in tqdm(InferenceImages(source, batch_size=batch, num_images=limit), desc="gFID reference", unit="batch"):
        real.update(inception(Tokenizer.to_uint8(originals).to(device)))
    for i in range(0, images.shape[0], batch):
        fake.update(inception(Tokenizer.to_uint8(images[i : i + batch]).to(device)))
    value = frechet_distance(*real.mean_and_covariance(), *fake.mean_and_covariance())
    return {"gfid": value, "num_samples": int(images.shape[0]), "num_reference": int(real.count),
            "inception": inception.weights_identity, "feature_layer": inception.feature_layer}
