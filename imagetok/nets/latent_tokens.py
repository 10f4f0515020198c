"""1D latent-token encoder and decoder (TiTok, Yu et al. 2024, https://arxiv.org/abs/2406.07550), with
the variable-length training of FlexTok (Bachmann et al. 2025, https://arxiv.org/abs/2502.13967) and
One-D-Piece (Miwa et al. 2025, https://arxiv.org/abs/2501.10064).

The encoder appends ``num_latent_tokens`` learned query tokens to the image's patch tokens and runs one
transformer over both; only the latent tokens leave it, ``[B, N, z_channels]``: a 1D sequence that any
quantizer family takes as ``[B, N, C]``. The decoder starts from one learned mask token per patch plus
the (projected) quantized latent tokens and predicts each patch's pixels.

Variable length: with ``token_drop`` the decoder sees, per training sample, only a random prefix of
``k`` latent tokens (the others are masked out of attention), so the first tokens learn to carry the
coarse content and any prefix decodes (``tok.decode(ids[:, :k])``). ``causal=True`` in the encoder
makes latent token ``i`` depend only on the image and tokens ``< i`` (SEED's causal 1D tokens).

The two transformer stages work on any grid of ``width``-d features, not only pixel patches:
:class:`LatentQueryReadout` (grid -> latent tokens) and :class:`MaskTokenDecode` (latent tokens -> grid)
are shared with the hybrid CNN + transformer nets of ``nets/hybrid.py`` (GigaTok), whose grid is a CNN's
feature map.
"""

from __future__ import annotations

import torch
from torch import nn

from imagetok.errors import ConfigValueError, check
from imagetok.nets.token_norm import make_output_norm
from imagetok.nets.transformer import (PatchPositions, Transformer, check_transformer_args, grid_of, init_weights,
                                       patchify, unpatchify)

TOKEN_DROPS = ("none", "uniform", "pow2")


def _check_latents(num_latent_tokens: int) -> None:
    check(isinstance(num_latent_tokens, int) and num_latent_tokens >= 1, "num_latent_tokens", num_latent_tokens,
          "a positive integer, e.g. 32 or 128")


class LatentQueryReadout(nn.Module):
    """Base of the 1D encoders: ``num_latent_tokens`` learned queries appended to a row-major grid of
    features ``[B, h*w, width]`` and one transformer over both; only the queries' outputs leave,
    ``[B, N, width]``. A subclass embeds its input into that grid and calls :meth:`init_readout` in its
    ``__init__`` (after its input embedding, so parameter order and initial draws stay those of TiTok's
    layout)."""

    token_layout = "sequence"

    def init_readout(self, *, grid: tuple[int, int], width: int, depth: int, num_heads: int, mlp_ratio: float,
                     pos_embed: str, num_latent_tokens: int, causal: bool) -> None:
        _check_latents(num_latent_tokens)
        self.num_latent_tokens, self.causal = num_latent_tokens, causal
        self.positions = PatchPositions(pos_embed, grid, width, num_heads)
        self.latent_tokens = nn.Parameter(torch.empty(num_latent_tokens, width))  # drawn by init_weights
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)

    def attention_mask(self, num_patches: int, device: torch.device) -> torch.Tensor | None:
        """Bool ``[P + N, P + N]`` (True = may attend) for ``causal``; None (full attention) otherwise."""
        if not self.causal:
            return None
        n, total = self.num_latent_tokens, num_patches + self.num_latent_tokens
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        mask[:num_patches, :num_patches] = True  # patches see patches
        mask[num_patches:, :num_patches] = True  # latent tokens see every patch ...
        mask[num_patches:, num_patches:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()  # ... and earlier tokens
        return mask

    def read_out(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Grid features ``[B, h*w, width]`` (row-major ``grid``) -> latent tokens ``[B, N, width]``."""
        patches = self.positions.add(features, grid)
        latents = self.latent_tokens.to(patches.dtype).expand(features.shape[0], -1, -1)
        x = torch.cat([patches, latents], dim=1)  # [B, P + N, width]
        rope = self.positions.rope(grid, self.num_latent_tokens, features.device)
        x = self.transformer(x, rope, self.attention_mask(patches.shape[1], features.device))
        return x[:, patches.shape[1]:]


class MaskTokenDecode(nn.Module):
    """Base of the 1D decoders: one learned mask token per cell of a fixed ``grid`` plus ``k`` latent
    tokens ``[B, k, width]`` through one transformer -> grid features ``[B, h*w, width]``, with the
    training-time prefix drop of ``token_drop``. A subclass projects its input to ``width``, maps the
    grid features to pixels, and calls :meth:`init_decode` in its ``__init__`` (after its input
    projection, as :class:`LatentQueryReadout`)."""

    token_layout = "sequence"

    def init_decode(self, *, grid: tuple[int, int], width: int, depth: int, num_heads: int, mlp_ratio: float,
                    pos_embed: str, num_latent_tokens: int, token_drop: str, min_tokens: int) -> None:
        _check_latents(num_latent_tokens)
        check(token_drop in TOKEN_DROPS, "token_drop", token_drop, f"one of {list(TOKEN_DROPS)}")
        check(isinstance(min_tokens, int) and 1 <= min_tokens <= num_latent_tokens, "min_tokens", min_tokens,
              f"an integer in [1, num_latent_tokens={num_latent_tokens}]")
        self.num_latent_tokens, self.token_drop, self.min_tokens = num_latent_tokens, token_drop, min_tokens
        self.grid = tuple(grid)
        self.latent_positions = nn.Parameter(torch.empty(num_latent_tokens, width))  # drawn by init_weights
        self.mask_token = nn.Parameter(torch.empty(width))  # drawn by init_weights
        self.positions = PatchPositions(pos_embed, self.grid, width, num_heads)
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)

    @property
    def variable_length(self) -> bool:
        """Whether training made every prefix of the tokens decode (``token_drop`` is on)."""
        return self.token_drop != "none"

    def prefix_lengths(self, k: int) -> list[int]:
        """The prefix lengths training draws from, for ``k`` given tokens."""
        low = min(self.min_tokens, k)
        if self.token_drop == "uniform":
            return list(range(low, k + 1))
        powers = [2**i for i in range(k.bit_length()) if low <= 2**i <= k]
        return sorted(set(powers + [k]))

    def draw_kept_tokens(self, batch: int, k: int, device: torch.device) -> torch.Tensor:
        """Tokens each training sample keeps, LongTensor ``[B]`` drawn from :meth:`prefix_lengths`
        (the global generator, so a resumed run draws what it would have)."""
        choices = torch.tensor(self.prefix_lengths(k))
        return choices[torch.randint(len(choices), (batch,))].to(device)

    def check_latents(self, z: torch.Tensor) -> None:
        """A clear error unless ``z`` is ``[B, k, z_channels]`` with ``1 <= k <= num_latent_tokens``."""
        if z.ndim != 3 or not 1 <= z.shape[1] <= self.num_latent_tokens:
            raise ConfigValueError("latent tokens", tuple(z.shape),
                                   f"[B, k, {self.z_channels}] with 1 <= k <= num_latent_tokens={self.num_latent_tokens}")

    def decode_grid(self, latents: torch.Tensor) -> torch.Tensor:
        """Projected latent tokens ``[B, k, width]`` -> grid features ``[B, h*w, width]`` (row-major)."""
        b, k = latents.shape[:2]
        latents = latents + self.latent_positions[:k].to(latents.dtype)
        cells = self.positions.add(self.mask_token.to(latents.dtype).expand(b, self.grid[0] * self.grid[1], -1), self.grid)
        x = torch.cat([cells, latents], dim=1)  # [B, P + k, width]
        mask = None
        if self.training and self.variable_length and torch.is_grad_enabled():
            keep = self.draw_kept_tokens(b, k, latents.device)
            visible = torch.arange(k, device=latents.device) < keep[:, None]  # [B, k]
            keys = torch.cat([visible.new_ones(b, cells.shape[1]), visible], dim=1)  # grid cells are always visible
            mask = keys[:, None, None, :]  # [B, 1, 1, P + k]: every query sees the kept keys
        x = self.transformer(x, self.positions.rope(self.grid, k, latents.device), mask)
        return x[:, : cells.shape[1]]


class LatentTokenEncoder(LatentQueryReadout):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> latent tokens ``[B, num_latent_tokens, z_channels]``.

    Args:
        patch_size / width / depth / num_heads / mlp_ratio / resolution / pos_embed: as
            :class:`~imagetok.nets.vit.ViTEncoder` (position embeddings of the patch tokens; the latent
            tokens are learned, so each one's embedding is its position).
        num_latent_tokens: ``N``, tokens per image.
        causal: latent token ``i`` attends to the patches and latent tokens ``<= i`` only, and patches to
            patches only, so a prefix of tokens never depends on the tokens after it.
        output_norm: ``none``, or ``batch``: each (token, channel) of the output standardised over the batch
            (:class:`~imagetok.nets.token_norm.TokenStandardize`), which keeps a readout from handing the
            quantizer the same code for every image.
    """

    def __init__(self, *, in_channels: int = 3, patch_size: int = 16, width: int = 512, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0, z_channels: int = 12, resolution: int = 256,
                 pos_embed: str = "learned", num_latent_tokens: int = 32, causal: bool = False,
                 output_norm: str = "none") -> None:
        super().__init__()
        check_transformer_args(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               patch_size=patch_size, resolution=resolution, pos_embed=pos_embed)
        _check_latents(num_latent_tokens)
        self.in_channels, self.z_channels, self.patch_size = in_channels, z_channels, patch_size
        self.downsample_factor = patch_size
        self.patch_embed = nn.Linear(in_channels * patch_size**2, width)
        self.init_readout(grid=(resolution // patch_size,) * 2, width=width, depth=depth, num_heads=num_heads,
                          mlp_ratio=mlp_ratio, pos_embed=pos_embed, num_latent_tokens=num_latent_tokens, causal=causal)
        self.proj_out = nn.Linear(width, z_channels)
        self.output_norm = make_output_norm(output_norm, num_latent_tokens, z_channels)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = grid_of(tuple(images.shape[-2:]), self.patch_size)
        return self.output_norm(self.proj_out(self.read_out(self.patch_embed(patchify(images, self.patch_size)), grid)))


class LatentTokenDecoder(MaskTokenDecode):
    """Latent tokens ``[B, k, z_channels]`` (any ``1 <= k <= num_latent_tokens``: a prefix of the sequence)
    -> images ``[B, out_channels, resolution, resolution]``, unbounded (trained toward [-1, 1]).

    Args:
        patch_size / width / depth / num_heads / mlp_ratio / resolution / pos_embed / num_latent_tokens:
            as :class:`LatentTokenEncoder`; ``resolution`` fixes the output size.
        token_drop: ``none``; ``uniform`` (each training sample keeps a prefix of ``k`` tokens, ``k``
            uniform in ``min_tokens..N``, One-D-Piece's tail-token drop); ``pow2`` (``k`` uniform over the
            powers of two ``>= min_tokens`` up to ``N``, and ``N``, FlexTok's nested dropout).
        min_tokens: the shortest prefix drawn in training.
    """

    def __init__(self, *, out_channels: int = 3, patch_size: int = 16, width: int = 512, depth: int = 8,
                 num_heads: int = 8, mlp_ratio: float = 4.0, z_channels: int = 12, resolution: int = 256,
                 pos_embed: str = "learned", num_latent_tokens: int = 32, token_drop: str = "none",
                 min_tokens: int = 1) -> None:
        super().__init__()
        check_transformer_args(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               patch_size=patch_size, resolution=resolution, pos_embed=pos_embed)
        _check_latents(num_latent_tokens)
        self.out_channels, self.z_channels, self.patch_size = out_channels, z_channels, patch_size
        self.proj_in = nn.Linear(z_channels, width)
        self.init_decode(grid=(resolution // patch_size,) * 2, width=width, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, pos_embed=pos_embed, num_latent_tokens=num_latent_tokens,
                         token_drop=token_drop, min_tokens=min_tokens)
        self.to_pixels = nn.Linear(width, out_channels * patch_size**2)
        init_weights(self)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the pixel projection: the adaptive GAN weight compares gradient norms here."""
        return self.to_pixels.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_latents(z)
        return unpatchify(self.to_pixels(self.decode_grid(self.proj_in(z))), self.grid, self.patch_size)
