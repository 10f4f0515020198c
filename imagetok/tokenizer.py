"""The ``Tokenizer``: encoder -> quantizer -> decoder, the object users train, save and load.

Images inside the model are float tensors in [-1, 1] with shape ``[B, 3, H, W]``; conversion from
uint8 / [0, 1] happens at the data edge (``imagetok.data``) and back with :meth:`Tokenizer.to_uint8`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from imagetok.errors import ConfigValueError
from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.utils.build import build


class Tokenizer(nn.Module):
    """Discrete image tokenizer.

    ``quant_conv`` (1x1) maps the encoder's ``z_channels`` to the quantizer's ``dim`` and
    ``post_quant_conv`` maps the quantizer's ``out_dim`` back to the decoder's ``z_channels``, as in VQGAN
    (VAR's VQVAE uses 3x3 convs there: ``quant_conv_kernel_size=3``).
    An encoder with ``token_layout = "sequence"`` (1D latent tokens, ``nets/latent_tokens.py``) emits
    ``[B, N, z_channels]``; both maps are then linear layers over the channels (the same operation on
    channels-last tokens), and indices are ``[B, N, K]``.

    Args:
        encoder: module with ``z_channels``; ``[B, 3, H, W] -> [B, z_channels, h, w]`` (or ``[B, N, z_channels]``).
        quantizer: a :class:`Quantizer` with ``dim``.
        decoder: module with ``z_channels``; ``[B, z_channels, h, w]`` (or ``[B, k, z_channels]``) ``-> [B, 3, H, W]``.
        config: the JSON-able ``{"encoder": {...}, "quantizer": {...}, "decoder": {...}}`` this
            tokenizer was built from (``_target_`` dicts, plus ``quant_conv_kernel_size`` when it is not
            1); kept so it can be saved and rebuilt.
        quant_conv_kernel_size: odd kernel size of ``quant_conv`` and ``post_quant_conv`` on grid
            latents ("same" padding); 1 except for VAR-style tokenizers (3).
    """

    def __init__(self, encoder: nn.Module, quantizer: Quantizer, decoder: nn.Module,
                 config: Mapping[str, Any] | None = None, quant_conv_kernel_size: int = 1) -> None:
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        if not (isinstance(quant_conv_kernel_size, int) and quant_conv_kernel_size >= 1 and quant_conv_kernel_size % 2):
            raise ConfigValueError("quant_conv_kernel_size", quant_conv_kernel_size, "an odd positive integer (1 or 3)")
        if self.is_sequence:
            if quant_conv_kernel_size != 1:
                raise ConfigValueError("quant_conv_kernel_size", quant_conv_kernel_size,
                                       "1 for 1D token sequences (the maps are linear layers over the channels)")
            self.quant_conv = nn.Linear(encoder.z_channels, quantizer.dim)
            self.post_quant_conv = nn.Linear(quantizer.out_dim, decoder.z_channels)
        else:
            k = quant_conv_kernel_size
            self.quant_conv = nn.Conv2d(encoder.z_channels, quantizer.dim, k, padding=k // 2)
            self.post_quant_conv = nn.Conv2d(quantizer.out_dim, decoder.z_channels, k, padding=k // 2)
        condition = getattr(decoder, "condition_channels", None)
        if getattr(decoder, "conditioned_on_quantized", False) and condition != quantizer.out_dim:
            raise ConfigValueError("decoder.condition_channels", condition,
                                   f"the quantizer's output channels {quantizer.out_dim} (the latent its norms are conditioned on)")
        self.config = copy.deepcopy(dict(config)) if config is not None else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Tokenizer":
        """Build from ``{"encoder": ..., "quantizer": ..., "decoder": ...}`` ``_target_`` dicts (and an
        optional ``quant_conv_kernel_size``); only classes inside ``imagetok`` are built, and a bad value
        raises ``ConfigValueError`` naming its key."""
        parts = {name: build(config[name], name) for name in ("encoder", "quantizer", "decoder")}
        return cls(**parts, config=config, quant_conv_kernel_size=config.get("quant_conv_kernel_size", 1))

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: Literal["ema", "raw"] = "ema") -> "Tokenizer":
        """Load a tokenizer from a Lightning training checkpoint (``weights_only`` unpickling), with
        the EMA weights by default; returned in eval mode."""
        from imagetok.export.checkpoint import load_tokenizer_from_checkpoint

        return load_tokenizer_from_checkpoint(path, weights)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None) -> "Tokenizer":
        """Load a ``save_pretrained`` directory or a Hugging Face Hub id (``owner/name``): safetensors
        weights, classes inside ``imagetok`` only; returned in eval mode, with no training parts."""
        from imagetok.export.pretrained import load_pretrained

        return load_pretrained(name_or_path, revision)

    def save_pretrained(self, out_dir: str | Path, extra: dict[str, Any] | None = None, card: str | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card) into ``out_dir``."""
        from imagetok.export.pretrained import save_pretrained

        return save_pretrained(self, out_dir, extra, card)

    def push_to_hub(self, repo_id: str, out_dir: str | Path | None = None, private: bool = True,
                    token: str | None = None) -> str:
        """Publish to the Hugging Face Hub: uploads ``out_dir`` (an existing export with its model card)
        or a fresh ``save_pretrained`` of this tokenizer. Returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir) if out_dir is not None else self.save_pretrained(tmp)
            return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder)))

    @property
    def codebook_sizes(self) -> list[int]:
        """Vocabulary size of each of the K sub-tokens per position."""
        return self.quantizer.codebook_sizes

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def is_sequence(self) -> bool:
        """Whether tokens form a 1D sequence ``[B, N, K]`` (latent-token encoders) rather than a grid."""
        return getattr(self.encoder, "token_layout", "grid") == "sequence"

    @property
    def variable_length(self) -> bool:
        """Whether any prefix ``ids[:, :k]`` of a 1D token sequence decodes (decoder trained with token drop)."""
        return self.is_sequence and bool(getattr(self.decoder, "variable_length", False))

    def token_shape(self, image_size: int | tuple[int, int]) -> tuple[int, ...]:
        """Shape of what :meth:`encode` returns for one image of this size (without the batch); the last
        entry is K. ``(h, w, K)`` for grid quantizers, ``(sum s_k^2, 1)`` for the multi-scale one,
        ``(N, K)`` for 1D latent tokens (whatever the image size)."""
        if self.is_sequence:
            return (self.encoder.num_latent_tokens, len(self.codebook_sizes))
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.downsample_factor
        return tuple(self.quantizer.index_shape_for((height // f, width // f)))

    def quantize(self, images: torch.Tensor) -> QuantizerOutput:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> quantizer output on the latent grid.

        ``H`` and ``W`` must be positive multiples of :attr:`downsample_factor`; other sizes raise
        :class:`ConfigValueError` naming the nearest valid sizes (nothing is padded or cropped silently)."""
        self._check_image_size(images)
        return self.quantizer(self.quant_conv(self.encoder(images)))

    def _check_image_size(self, images: torch.Tensor) -> None:
        f = self.downsample_factor
        height, width = images.shape[-2:]
        if height % f or width % f or height < f or width < f:
            def near(n: int) -> str:
                return " or ".join(str(m) for m in sorted({max(f, n // f * f), max(f, -(-n // f) * f)}))

            raise ConfigValueError("images", f"{height}x{width}", f"heights and widths that are multiples of this "
                                   f"tokenizer's downsampling factor {f} (pad or resize: height {near(height)}, "
                                   f"width {near(width)})")

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``[B, out_dim, h, w]`` (or ``[B, k, out_dim]``) -> images ``[B, 3, H, W]``
        (about [-1, 1], unclamped). A decoder whose norms are conditioned on the quantized latent (MoVQ's
        spatial norms: ``decoder.conditioned_on_quantized``) receives ``z_q`` as its second input."""
        if getattr(self.decoder, "conditioned_on_quantized", False):
            return self.decoder(self.post_quant_conv(z_q), z_q)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> (reconstruction ``[B, 3, H, W]``, QuantizerOutput)."""
        out = self.quantize(images)
        return self.decode_latents(out.z_q), out

    @torch.no_grad()
    def encode(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> LongTensor indices ``[B, *token_shape]`` (``[B, h, w, K]``
        for grid quantizers, ``[B, sum s_k^2, 1]`` for the multi-scale one, ``[B, N, K]`` for 1D tokens).

        ``num_tokens=k`` keeps the first ``k`` tokens of a 1D sequence, ``[B, k, K]`` (for a tokenizer
        trained with token drop, :attr:`variable_length`, every such prefix decodes)."""
        indices = self.quantize(images).indices
        if num_tokens is None:
            return indices
        if not self.is_sequence:
            raise ConfigValueError("num_tokens", num_tokens, "None for a tokenizer whose tokens form a grid "
                                   "(only 1D latent-token tokenizers take a number of tokens)")
        n = indices.shape[1]
        if not (isinstance(num_tokens, int) and 1 <= num_tokens <= n):
            raise ConfigValueError("num_tokens", num_tokens, f"an integer in [1, {n}]")
        return indices[:, :num_tokens]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, *token_shape]`` (as :meth:`encode` returns) -> images ``[B, 3, H, W]`` (about [-1, 1], unclamped)."""
        return self.decode_latents(self.indices_to_latents(indices))

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, *token_shape]`` -> quantized latents ``[B, out_dim, h, w]`` (``[B, N, out_dim]``
        for 1D tokens)."""
        return self.quantizer.indices_to_latents(indices, channels_last=self.is_sequence)

    @staticmethod
    def preprocess(images: Any) -> torch.Tensor:
        """PIL image(s) or uint8 tensor(s) -> float ``[B, 3, H, W]`` in [-1, 1].

        Accepts one PIL image or a list of them (converted to RGB, all the same size), a uint8 tensor
        ``[3, H, W]`` / ``[B, 3, H, W]`` with values 0..255, or a float tensor in [0, 1] of those shapes.
        Resizing and cropping are the caller's choice (the tokenizer takes any multiple of its
        downsampling factor)."""
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            from torchvision.transforms.functional import pil_to_tensor

            images = torch.stack([pil_to_tensor(im.convert("RGB")) for im in images])
        if not torch.is_tensor(images):
            raise TypeError(f"preprocess takes PIL images or tensors, not {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] or [3, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1
        if images.is_floating_point():
            return images.float() * 2 - 1
        raise TypeError(f"expected uint8 (0..255) or float ([0, 1]) images, got {images.dtype}")

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> list of RGB PIL images (rounded like :meth:`to_uint8`)."""
        from PIL import Image

        pixels = Tokenizer.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) -> uint8 ``[0, 255]`` rounded to nearest, as a saved PNG holds them."""
        return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
