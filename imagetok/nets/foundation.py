"""Frozen foundation-model backbones (DINOv2 through timm), the one loader that the DINO discriminator
and REPA-style decoder alignment share.

DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision") ViTs are
built with ``timm.create_model`` by name (``vit_small_patch14_dinov2`` by default; ``..._base_...``,
``..._large_...``, ``..._giant_...`` by name). Weights come from a local file (``weights_path``:
safetensors or a torch state dict, read with ``weights_only=True``) or from the Hugging Face cache that
timm uses (``timm/<model>.lvd142m``); nothing is ever downloaded here. A missing file is one
:class:`MissingWeightsError` line that names the file and how to get it.

``random_backbone=True`` builds a seeded, randomly initialised network instead: for tests and CPU
recipes only (its features carry no semantics; results with it say nothing about DINOv2).

The backbone is frozen (``requires_grad=False``) and stays in eval mode even when a parent is put in
train mode. Its users keep it outside their module tree, so it never enters a checkpoint, the weight
EMA, an optimizer or DDP; it is rebuilt identically from the same file or seed on resume and on every
rank. It runs under whatever autocast the trainer set (float32 or bf16-mixed); gradients flow through
it to its input (the discriminator's generator loss needs them), never into its weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import MissingWeightsError, check

DEFAULT_MODEL = "vit_small_patch14_dinov2"
HF_WEIGHTS_FILE = "model.safetensors"  # what timm's Hugging Face repos hold


def hf_repo(model: str, tag: str = "lvd142m") -> str:
    """Hugging Face repo timm loads ``model`` from, e.g. ``timm/vit_small_patch14_dinov2.lvd142m``."""
    return f"timm/{model}.{tag}" if "." not in model else f"timm/{model}"


def cached_weights_file(model: str) -> str | None:
    """Path of ``model``'s weights in the local Hugging Face cache, or None; never uses the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=hf_repo(model), filename=HF_WEIGHTS_FILE)
    return found if isinstance(found, str) and Path(found).is_file() else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``; a checkpoint
    that wraps it in ``{"model": ...}`` or ``{"state_dict": ...}`` is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    return dict(state)


def missing_weights_message(model: str, path: str | None, config_key: str) -> str:
    repo = hf_repo(model)
    where = f"not found at {path}" if path else "not in the Hugging Face cache"
    return (f"{model} needs the weights file '{HF_WEIGHTS_FILE}' of {repo}: {where}. On a machine with network run "
            f"`huggingface-cli download {repo} {HF_WEIGHTS_FILE}` (it goes to the Hugging Face cache, "
            f"$HF_HOME/hub), copy the cache here or set {config_key}=<file>; random_backbone=true is for tests only.")


class FrozenBackbone(nn.Module):
    """Frozen timm ViT: images ``[B, 3, H, W]`` in [-1, 1] -> features of the chosen blocks.

    Images are mapped to [0, 1], normalised with the model's mean/std (ImageNet for DINOv2) and resized
    (bilinear, antialiased) to ``input_size``; the output of each block in ``blocks`` is its patch
    tokens as a map ``[B, embed_dim, input_size / patch, input_size / patch]`` (class and register
    tokens dropped), with the final layer norm applied when ``norm``.

    Args:
        model: timm model name (a ViT with ``forward_intermediates``), e.g. ``vit_small_patch14_dinov2``,
            ``vit_base_patch14_dinov2``, ``vit_large_patch14_dinov2``.
        weights_path: local weights file (``.safetensors`` or a torch state dict); None = the Hugging
            Face cache (``timm/<model>.lvd142m``, ``model.safetensors``).
        random_backbone: seeded random weights (tests and CPU recipes only).
        input_size: side the images are resized to (a multiple of the patch size; DINOv2 trains at 224).
        blocks: indices of the blocks whose outputs are returned (negative counts from the end).
        norm: apply the final layer norm to the returned features (REPA aligns to normed tokens).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a small ``depth``/``embed_dim`` for
            tests); with weights they must describe the architecture of the file, or loading fails.
        seed: initialisation seed of the random backbone (identical on every rank and on resume).
        config_key: the key named in the missing-weights message.
    """

    def __init__(self, model: str = DEFAULT_MODEL, weights_path: str | None = None, random_backbone: bool = False,
                 input_size: int = 224, blocks: Sequence[int] = (-1,), norm: bool = False,
                 model_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                 config_key: str = "weights_path") -> None:
        super().__init__()
        import timm

        check(isinstance(model, str) and bool(timm.list_models(model.split(".")[0])), "model", model,
              "a timm model name, e.g. vit_small_patch14_dinov2 or vit_base_patch14_dinov2")
        check(isinstance(input_size, int) and input_size > 0, "input_size", input_size, "a positive integer")
        state = None if random_backbone else self._load_weights(model, weights_path, config_key)
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            self.net = timm.create_model(model, pretrained=False, num_classes=0, img_size=input_size,
                                         dynamic_img_size=False, **dict(model_kwargs or {}))
        patch = self.net.patch_embed.patch_size[0]
        check(input_size % patch == 0, "input_size", input_size, f"a multiple of {model}'s patch size {patch}")
        depth = len(self.net.blocks)
        check(len(blocks) > 0 and all(isinstance(b, int) and -depth <= b < depth for b in blocks), "blocks",
              list(blocks), f"a non-empty list of block indices in [-{depth}, {depth - 1}] ({model} has {depth} blocks)")
        if state is not None:
            self._load_into_net(state)
        self.model, self.input_size, self.patch_size, self.norm = model, input_size, patch, norm
        self.random = random_backbone
        self.blocks = [b % depth for b in blocks]
        self.out_dim: int = self.net.embed_dim
        self.grid = input_size // patch
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _load_weights(model: str, weights_path: str | None, config_key: str) -> dict[str, torch.Tensor]:
        path = str(Path(weights_path).expanduser()) if weights_path else cached_weights_file(model)
        if path is None or not Path(path).is_file():
            raise MissingWeightsError(missing_weights_message(model, path, config_key))
        return read_state_dict(path)

    def _load_into_net(self, state: dict[str, torch.Tensor]) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        # timm's filter maps the original DINOv2 key names and resamples the position embedding to input_size
        state = checkpoint_filter_fn(state, self.net)
        try:
            missing, unexpected = self.net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches: another architecture's file
            raise MissingWeightsError(f"the weights file does not fit {self.model}: "
                                      f"{str(err).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise MissingWeightsError(f"the weights file does not fit {self.model}: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)  # frozen: dropout and drop-path stay off

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> normalised ``[B, 3, input_size, input_size]``."""
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> one ``[B, out_dim, grid, grid]`` map per entry of ``blocks``."""
        return self.net.forward_intermediates(self.preprocess(images), indices=self.blocks, norm=self.norm,
                                              output_fmt="NCHW", intermediates_only=True)
