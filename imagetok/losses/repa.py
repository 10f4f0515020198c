"""REPA-style alignment of an intermediate decoder feature map with a frozen teacher's patch features.

REPA (Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion Transformers Is
Easier Than You Think", https://arxiv.org/abs/2410.06940) projects a hidden state of the network with a
small MLP and maximises its cosine similarity to a frozen self-supervised encoder's patch features.
GigaTok (Xiong et al. 2025, "GigaTok: Scaling Visual Tokenizers to 3 Billion Parameters for
Autoregressive Image Generation") applies it to a tokenizer's decoder, which keeps the latent space
semantic as tokenizers grow.

Here a forward hook on one decoder layer (a CNN decoder's level ``[B, C, h, w]`` or a ViT decoder's
block ``[B, N, C]`` on a square token grid) captures its output during the training forward; a 3-layer
MLP (SiLU) maps it to the teacher's width; the loss is ``weight * mean(1 - cos)`` against the teacher's
features of the input images, resized to the same grid. The projector trains with the generator (it is
in the generator's optimizer and checkpoints); the teacher (:class:`FrozenBackbone`, the same loader as
the DINO discriminator) stays outside the module tree and gets no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import ConfigValueError, check
from imagetok.losses.semantic import resize_to_grid
from imagetok.nets.foundation import FrozenBackbone


def default_layer(decoder: nn.Module) -> str:
    """The decoder layer aligned by default: half-way through the upsampling path (CNN: the middle
    level of ``up``) or through the blocks (ViT: ``transformer.blocks.<depth // 2 - 1>``)."""
    if isinstance(getattr(decoder, "up", None), nn.ModuleList):
        return f"up.{len(decoder.up) // 2}"
    blocks = getattr(getattr(decoder, "transformer", None), "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return f"transformer.blocks.{max(len(blocks) // 2 - 1, 0)}"
    raise ConfigValueError("loss.repa.layer", None, f"the name of a {type(decoder).__name__} submodule "
                           "(no default for this decoder)")


def as_feature_map(h: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` as is; tokens ``[B, N, C]`` of a square grid -> ``[B, C, sqrt N, sqrt N]``."""
    if h.ndim == 4:
        return h
    side = math.isqrt(h.shape[1])
    if h.ndim != 3 or side * side != h.shape[1]:
        raise ConfigValueError("loss.repa.layer", tuple(h.shape), "a layer whose output is [B, C, h, w] or "
                               "[B, N, C] tokens of a square grid")
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)


class DecoderAlignment(nn.Module):
    """``weight * mean_positions(1 - cos(MLP(decoder feature), teacher feature))``.

    Args:
        teacher: frozen backbone; its last entry of ``blocks`` is the target ``[B, out_dim, g, g]``.
        weight: weight of the term in the generator loss.
        layer: dotted name of the decoder submodule to hook (``decoder.get_submodule``); None = the
            :func:`default_layer`.
        hidden_dim: width of the projector's two hidden layers (REPA: 2048).
    """

    def __init__(self, *, teacher: FrozenBackbone, weight: float = 0.5, layer: str | None = None,
                 hidden_dim: int = 2048) -> None:
        super().__init__()
        check(isinstance(weight, (int, float)) and weight >= 0, "weight", weight, "a float >= 0")
        check(isinstance(hidden_dim, int) and hidden_dim >= 1, "hidden_dim", hidden_dim, "an integer >= 1")
        check(isinstance(teacher, FrozenBackbone), "teacher", type(teacher).__name__,
              "an imagetok.nets.foundation.FrozenBackbone")
        teacher.requires_grad_(False).eval()
        self._teacher = [teacher]  # outside the module tree: no checkpoint, optimizer, EMA or DDP
        self.weight, self.layer, self.hidden_dim = float(weight), layer, hidden_dim
        self.projector: nn.Module | None = None  # built by attach(), once the layer's width is known
        self._captured: list[torch.Tensor] = []
        self._hook = None

    @property
    def teacher(self) -> FrozenBackbone:
        return self._teacher[0]

    def attach(self, decoder: nn.Module, latent_grid: tuple[int, int]) -> None:
        """Hook ``layer`` of ``decoder`` and build the projector for its width, found by one decoder
        forward on zero latents ``[1, decoder.z_channels, *latent_grid]``."""
        self.layer = self.layer or default_layer(decoder)
        try:
            target = decoder.get_submodule(self.layer)
        except AttributeError:
            names = [n for n, _ in decoder.named_modules() if n.count(".") <= 2 and n]
            raise ConfigValueError("loss.repa.layer", self.layer, f"a submodule of the decoder, e.g. one of {names[:12]}") from None
        if self._hook is not None:
            self._hook.remove()
        self._hook = target.register_forward_hook(self._capture)
        param = next(decoder.parameters())
        with torch.no_grad():
            decoder(torch.zeros(1, decoder.z_channels, *latent_grid, device=param.device, dtype=param.dtype))
        width = as_feature_map(self._captured.pop()).shape[1]
        dim = self.teacher.out_dim
        self.projector = nn.Sequential(nn.Linear(width, self.hidden_dim), nn.SiLU(),
                                       nn.Linear(self.hidden_dim, self.hidden_dim), nn.SiLU(),
                                       nn.Linear(self.hidden_dim, dim)).to(param.device)

    def _capture(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() or not self._captured:  # training forwards (and attach's probe), not evaluation
            self._captured[:] = [output]  # only the newest forward's feature is kept

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``images`` ``[B, 3, H, W]`` in [-1, 1], the inputs of the forward whose decoder feature was
        captured -> (weighted loss scalar, ``{"repa_cosine": mean cosine similarity}`` detached)."""
        if self.projector is None or not self._captured:
            raise RuntimeError("DecoderAlignment.attach(decoder, grid) must run, and the tokenizer's forward, "
                               "before the REPA loss (imagetok.training.run.build attaches it)")
        feats = as_feature_map(self._captured.pop())  # [B, C, h, w]
        teacher = self.teacher
        if teacher.mean.device != images.device:
            teacher.to(images.device)
        with torch.no_grad():
            target = teacher(images.detach())[-1].float()  # [B, out_dim, g, g]
        goal = resize_to_grid(target, tuple(feats.shape[-2:]))
        projected = self.projector(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, out_dim, h, w]
        cosine = F.cosine_similarity(projected.float(), goal, dim=1).mean()
        return self.weight * (1 - cosine), {"repa_cosine": cosine.detach()}
