"""The FID feature extractor: torch-fidelity's port of the TensorFlow FID Inception v3
(``pt_inception-2015-12-05``), the network and resize that torch-fidelity and pytorch-fid use, so our
numbers are comparable with papers that use those tools.

torch-fidelity downloads the weights on first use; offline that fails deep inside ``torch.hub``. We
look for the file ourselves (a local path, then torch's hub cache) so a missing file is one line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from imagetok.errors import MissingWeightsError

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
FEATURE_LAYERS = ("64", "192", "768", "2048")


def inception_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(weights_path: str | None) -> str | None:
    """Path of the Inception weights, or None to let torch-fidelity download them (only when online
    and no path was given). Raises :class:`MissingWeightsError` naming the file and where to put it."""
    path = Path(weights_path).expanduser() if weights_path else inception_cache_path()
    if path.is_file():
        return str(path)
    if weights_path or os.environ.get("IMAGETOK_OFFLINE") == "1":
        raise MissingWeightsError(
            f"FID needs the Inception weights '{INCEPTION_FILE}': not found at {path}. Download {INCEPTION_URL} "
            f"on a machine with network and put it at {inception_cache_path()} or set eval.inception_weights=<file>.")
    return None


class InceptionFeatures(nn.Module):
    """uint8 images ``[B, 3, H, W]`` (0..255, any size) -> float32 features ``[B, D]`` of one layer of
    the FID Inception (``D`` = ``feature_layer``: 2048 is the FID standard; smaller layers are cheap,
    for tests). Images are resized to 299x299 inside, with TF1's bilinear resize, as torch-fidelity does.

    Args:
        feature_layer: ``"2048"`` (pool3, standard), ``"768"``, ``"192"`` or ``"64"``.
        weights_path: local weights file; None looks in torch's hub cache, then downloads (unless
            ``IMAGETOK_OFFLINE=1``).
        random_weights: randomly initialised network (tests only: the numbers are then not FID).
    """

    def __init__(self, feature_layer: str = "2048", weights_path: str | None = None, random_weights: bool = False) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        feature_layer = str(feature_layer)
        if feature_layer not in FEATURE_LAYERS:
            raise ValueError(f"eval.feature_layer={feature_layer!r} is invalid: allowed values are {FEATURE_LAYERS}")
        self.feature_layer, self.dim = feature_layer, int(feature_layer)
        self.net = _unloaded_inception(FeatureExtractorInceptionV3, feature_layer)
        if random_weights:
            self.weights_identity = "random (tests only; not FID)"
        else:
            path = resolve_inception_weights(weights_path)
            if path is None:  # online, nothing cached: fetch into the cache, checked against the hash in the name
                path = str(inception_cache_path())
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, hash_prefix=INCEPTION_FILE.rsplit("-", 1)[1][:8])
            # loaded here with weights_only (torch-fidelity itself would unpickle the file unrestricted)
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.weights_identity = f"pt_inception-2015-12-05 ({INCEPTION_FILE})"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images_uint8.device.type, enabled=False):
            return self.net(images_uint8)[0]


def _unloaded_inception(cls: type, feature_layer: str) -> nn.Module:
    """torch-fidelity's extractor, built with its constructor's weight loading made a no-op: weights are
    then loaded by us with ``weights_only=True``, or kept at their (seeded) random initialisation for
    tests, so training's validation FID and evaluate.py build the same random network."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(0)
        stack.enter_context(mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
                                       lambda *a, **k: {}))
        stack.enter_context(mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None))
        net = cls("inception-v3-compat", [feature_layer])
    return net
