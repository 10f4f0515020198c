"""Frozen teacher networks whose features the semantic branches of a tokenizer are aligned with.

A teacher maps images ``[B, 3, H, W]`` in [-1, 1] to a feature map ``[B, out_dim, h, w]`` (float32).
It is frozen and always in eval mode, and the losses keep it outside the model's module tree, so it
never reaches a checkpoint, the weight EMA, an optimizer or DDP. Because it is not checkpointed it
must be rebuilt identically: pretrained teachers load fixed files, the random one is seeded.

* :class:`TorchvisionTeacher`: ImageNet ResNet-18/50 or ViT-B/16 from torchvision, weights read from a
  local file or torch's hub cache (never downloaded during training; a missing file is one line).
* :class:`RandomCNNTeacher`: a seeded random conv net, for tests and CPU recipes (its features carry
  no semantics, only a fixed nonlinear target).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imagetok.errors import MissingWeightsError, check

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# arch -> (torchvision builder, weights enum name, {layer: channels}, default layer)
_ARCHS = {
    "resnet18": ("resnet18", "ResNet18_Weights", {"layer3": 256, "layer4": 512}, "layer4"),
    "resnet50": ("resnet50", "ResNet50_Weights", {"layer3": 1024, "layer4": 2048}, "layer4"),
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights", {"tokens": 768}, "tokens"),
}


class Teacher(nn.Module):
    """Frozen feature extractor: ``requires_grad=False``, stays in eval mode, runs without grad."""

    out_dim: int

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # batch-norm statistics and dropout stay frozen

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> features ``[B, out_dim, h, w]`` (float32, no grad)."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.features(images.float())


class RandomCNNTeacher(Teacher):
    """Seeded random conv net (tests, CPU recipes): ``[B, 3, H, W] -> [B, out_dim, H/2^L, W/2^L]``.

    Args:
        out_dim: feature channels.
        ch: width of the hidden layers.
        num_layers: stride-2 conv layers (the feature grid is ``H / 2**num_layers``).
        seed: initialisation seed, so a resumed or another rank's run gets the same teacher.
    """

    def __init__(self, out_dim: int = 16, ch: int = 16, num_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        check(isinstance(out_dim, int) and out_dim >= 1, "out_dim", out_dim, "a positive integer")
        check(isinstance(num_layers, int) and num_layers >= 1, "num_layers", num_layers, "a positive integer")
        self.out_dim = out_dim
        layers, c_in = [], 3
        for i in range(num_layers):
            c_out = out_dim if i == num_layers - 1 else ch
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            c_in = c_out
        self.net = nn.Sequential(*layers[:-1])  # no activation after the last conv
        generator = torch.Generator().manual_seed(seed)  # independent of the global RNG
        for p in self.net.parameters():
            p.data.copy_(torch.randn(p.shape, generator=generator) * (0.0 if p.ndim == 1 else (1.0 / p[0].numel()) ** 0.5))
        self.freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def teacher_weights_file(arch: str) -> str:
    """File name torchvision gives the ImageNet weights of ``arch`` (e.g. ``resnet50-11ad3fa6.pth``)."""
    import torchvision.models as tvm

    builder, enum_name, _, _ = _ARCHS[arch]
    return Path(getattr(tvm, enum_name).DEFAULT.url).name


class TorchvisionTeacher(Teacher):
    """ImageNet-pretrained torchvision backbone as a teacher.

    Images are mapped to [0, 1], normalised with the ImageNet statistics and resized to ``input_size``.
    ResNets give the ``layer`` feature map (``layer3``: stride 16, ``layer4``: stride 32); ViT-B/16 gives
    its final patch tokens (stride 16, 768 channels) as a map.

    Args:
        arch: ``"resnet18"``, ``"resnet50"`` or ``"vit_b_16"``.
        weights_path: the torchvision state-dict file; None looks in ``$TORCH_HOME/hub/checkpoints``
            for the file name torchvision uses (the DEFAULT weights of ``arch``).
        layer: ResNet stage (``"layer3"`` or ``"layer4"``); ``"tokens"`` for ViT. None = the default.
        input_size: side the images are resized to (ViT-B/16 needs 224).
    """

    def __init__(self, arch: str = "resnet50", weights_path: str | None = None, layer: str | None = None,
                 input_size: int = 224) -> None:
        super().__init__()
        check(arch in _ARCHS, "arch", arch, f"one of {sorted(_ARCHS)}")
        builder, _, layers, default_layer = _ARCHS[arch]
        layer = default_layer if layer is None else layer
        check(layer in layers, "layer", layer, f"one of {sorted(layers)} for {arch}")
        check(arch != "vit_b_16" or input_size == 224, "input_size", input_size, "224 for vit_b_16")
        self.arch, self.layer, self.input_size, self.out_dim = arch, layer, input_size, layers[layer]
        state = self._load_state_dict(arch, weights_path)
        import torchvision.models as tvm

        self.net = getattr(tvm, builder)(weights=None)
        self.net.load_state_dict(state, strict=True)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @staticmethod
    def _load_state_dict(arch: str, weights_path: str | None) -> dict[str, torch.Tensor]:
        name = teacher_weights_file(arch)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / name
        path = Path(weights_path).expanduser() if weights_path else cache
        if not path.is_file():
            import torchvision.models as tvm

            url = getattr(tvm, _ARCHS[arch][1]).DEFAULT.url
            raise MissingWeightsError(
                f"The {arch} teacher needs torchvision's ImageNet weights '{name}': not found at {path}. Download "
                f"{url} on a machine with network, then put it at {cache} or set loss.semantic.teacher.weights_path=<file>.")
        return torch.load(path, map_location="cpu", weights_only=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        if self.arch == "vit_b_16":
            net = self.net
            tokens = net._process_input(x)  # [B, N, 768] patch embeddings
            tokens = torch.cat([net.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
            tokens = net.encoder(tokens)[:, 1:]  # drop the class token; final layer norm applied
            side = self.input_size // 16
            return tokens.transpose(1, 2).reshape(x.shape[0], self.out_dim, side, side)
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
            if name == self.layer:
                return x
        raise AssertionError("unreachable: layer is checked in __init__")
