"""Semantic alignment of a tokenizer's features with a frozen teacher (FQGAN's representation alignment,
TokenFlow's / DualToken's semantic distillation).

Every ``QuantizerOutput.features`` entry named ``"semantic"`` or ``"semantic/<anything>"``
(``[B, C_t, h, w]``, the token grid) is compared with the teacher's features of the input images,
resized to the token grid, by ``1 - cosine similarity`` over channels, averaged over positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import ConfigValueError, check


def semantic_features(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``features`` that a teacher supervises (``"semantic"``, ``"semantic/..."``)."""
    return {k: v for k, v in features.items() if k == "semantic" or k.startswith("semantic/")}


def resize_to_grid(feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Teacher features ``[B, C, H', W']`` -> ``[B, C, h, w]``: area averaging when shrinking (every
    teacher position counts), bilinear when enlarging."""
    if tuple(feats.shape[-2:]) == tuple(size):
        return feats
    if feats.shape[-2] >= size[0] and feats.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feats, size)
    return F.interpolate(feats, size=size, mode="bilinear", align_corners=False)


class SemanticAlignmentLoss(nn.Module):
    """``weight * sum_k mean(1 - cos(features_k, teacher(images)))`` over the semantic feature maps.

    Args:
        teacher: frozen module ``[B, 3, H, W]`` in [-1, 1] -> ``[B, out_dim, H', W']`` with ``out_dim``
            (``imagetok.nets.teachers``). Kept outside the module tree: it never enters a checkpoint,
            the weight EMA, an optimizer or DDP.
        weight: weight of each feature map's term (the terms of several sub-codebooks add up).
    """

    def __init__(self, teacher: nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        check(weight >= 0, "weight", weight, "a float >= 0")
        check(isinstance(getattr(teacher, "out_dim", None), int), "teacher", type(teacher).__name__,
              "a teacher module with an integer out_dim (imagetok.nets.teachers)")
        self.weight = weight
        teacher.requires_grad_(False).eval()
        self._teacher = [teacher]

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, images: torch.Tensor, features: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``images`` ``[B, 3, H, W]`` in [-1, 1], ``features`` from ``QuantizerOutput.features`` ->
        (weighted loss scalar, detached per-map ``{"cosine_distance/<name>": 1 - cos}``)."""
        maps = semantic_features(features)
        if not maps:
            raise ConfigValueError("loss.semantic", "a teacher", "null for a quantizer without semantic features "
                                   "(use quantizer=fqgan with semantic_dim set, or quantizer=dual)")
        teacher = self.teacher.to(images.device)
        target = teacher(images)  # [B, C_t, H', W'] float32, no grad
        total, logs = images.new_zeros((), dtype=torch.float32), {}
        for name, feats in maps.items():
            if feats.ndim != 4 or feats.shape[1] != teacher.out_dim:
                raise ConfigValueError("quantizer.semantic_dim", tuple(feats.shape[1:2]),
                                       f"the teacher's {teacher.out_dim} feature channels (features['{name}'] "
                                       f"must be [B, {teacher.out_dim}, h, w])")
            goal = resize_to_grid(target, tuple(feats.shape[-2:]))
            term = 1 - F.cosine_similarity(feats.float(), goal, dim=1).mean()
            total = total + term
            logs[f"cosine_distance/{name}"] = term.detach()
        return self.weight * total, logs
