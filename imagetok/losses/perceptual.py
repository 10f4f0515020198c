"""LPIPS perceptual distance (Zhang et al. 2018, https://arxiv.org/abs/1801.03924) through the ``lpips``
package, with the VGG16 backbone weights resolved from a local file or torch's hub cache.

``lpips`` ships its calibrated linear layers but downloads the ImageNet VGG16 backbone on first use;
offline, that download fails deep inside torchvision. We build the network with a random backbone and
load the backbone ourselves, so a missing file is one clear line that says where to put it.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch import nn

from imagetok.errors import MissingWeightsError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1, which lpips uses
VGG16_HASH_PREFIX = "397923af"  # sha256 prefix, as torchvision names its files
DOWNLOAD_TIMEOUT_S = 30
# torchvision `features` index ranges that lpips groups into slice1..slice5
_VGG_SLICES = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}


def hub_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def load_vgg16_state_dict(weights_path: str | None = None, allow_download: bool = True,
                          config_key: str = "loss.perceptual_weights_path") -> dict[str, torch.Tensor]:
    """torchvision VGG16 state dict from ``weights_path``, else the hub cache, else a download
    (skipped when ``IMAGETOK_OFFLINE=1``).
    Raises :class:`MissingWeightsError` (one line: which file, where to put it) when none works."""
    path = Path(weights_path).expanduser() if weights_path else hub_cache_path()
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    hint = (f"LPIPS needs the VGG16 ImageNet weights '{VGG16_FILE}': not found at {path}. Download it on a "
            f"machine with network (torchvision VGG16_Weights.IMAGENET1K_V1), then put it at {hub_cache_path()} "
            f"or set {config_key}=<file>.")
    if weights_path or not allow_download or os.environ.get("IMAGETOK_OFFLINE") == "1":
        raise MissingWeightsError(hint)
    from torchvision.models import VGG16_Weights

    path.parent.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a network that drops packets must not hang the run
    try:  # with a progress bar (528 MB), checked against the hash in the file name
        torch.hub.download_url_to_file(VGG16_Weights.IMAGENET1K_V1.url, str(path), hash_prefix=VGG16_HASH_PREFIX)
    except Exception as err:  # offline: URLError / OSError / timeout / a hash mismatch
        raise MissingWeightsError(f"{hint} (download failed: {type(err).__name__})") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return torch.load(path, map_location="cpu", weights_only=True)


def _vgg16_features_only(*args, **kwargs) -> SimpleNamespace:
    """Stands in for ``torchvision.models.vgg16`` while lpips builds its backbone: lpips keeps only
    ``.features``, and initialising torchvision's classifier (120M parameters) took 4-9 s of every run.
    The convolutions are initialised as torchvision does (Kaiming normal, fan-out; zero bias)."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return SimpleNamespace(features=features)


def _lpips_vgg() -> nn.Module:
    """lpips' VGG LPIPS network with its calibrated linear heads and a randomly initialised backbone."""
    import lpips

    with warnings.catch_warnings(), mock.patch.object(lpips.pretrained_networks.tv, "vgg16", _vgg16_features_only):
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` argument inside lpips
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


class LPIPS(nn.Module):
    """LPIPS-VGG distance; inputs ``[B, 3, H, W]`` in [-1, 1]; returns the batch mean (scalar).

    Frozen (``requires_grad=False``, always eval mode): it never enters an optimizer or DDP's graph.

    Args:
        weights_path: local torchvision VGG16 file; None looks in torch's hub cache, then downloads.
        random_backbone: skip the backbone weights (tests only: the distance is then not LPIPS).
    """

    def __init__(self, weights_path: str | None = None, random_backbone: bool = False, allow_download: bool = True,
                 config_key: str = "loss.perceptual_weights_path") -> None:
        super().__init__()
        # the weights first: a missing file is reported before any network is built
        vgg = None if random_backbone else load_vgg16_state_dict(weights_path, allow_download, config_key)
        self.net = _lpips_vgg()
        if vgg is not None:
            mapped = {f"slice{s}.{i}.{p}": vgg[f"features.{i}.{p}"]
                      for s, idx in _VGG_SLICES.items() for i in idx for p in ("weight", "bias")
                      if f"features.{i}.{p}" in vgg}
            self.net.net.load_state_dict(mapped, strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # dropout in the linear heads must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(x.float(), y.float()).mean()
