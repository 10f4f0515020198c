"""The global random number generators (torch, CUDA, numpy, Python ``random``) as checkpoint state.

Dead-code restarts, k-means seeds and any dropout draw from the global generators, so an exact
resume must continue their streams where the interrupted run left them. Lightning saves the
weights, optimisers, schedulers and loop counters; :class:`RandomState` adds the generators.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def rng_state_to_checkpoint(states: dict[str, Any]) -> dict[str, Any]:
    """Lightning's ``_collect_rng_states()`` as tensors and primitives only, so the checkpoint still
    loads with ``torch.load(weights_only=True)`` (numpy's state holds an ndarray)."""
    out = dict(states)
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]
    return out


def rng_state_from_checkpoint(states: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`rng_state_to_checkpoint`, ready for Lightning's ``_set_rng_states``."""
    out = dict(states)
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    if "python" in states:  # weights_only loading gives lists where random.setstate wants tuples
        version, internal, gauss = states["python"]
        out["python"] = (version, tuple(internal), gauss)
    if "torch.cuda" in out and (not torch.cuda.is_available() or len(out["torch.cuda"]) != torch.cuda.device_count()):
        out.pop("torch.cuda")  # another machine: the CUDA streams cannot continue, the CPU ones still do
    return out


class RandomState(L.Callback):
    """Saves the global generators with every checkpoint and, after a resume, restores them just
    before the first training step, so that step draws what it would have drawn without the stop.

    Validation runs with its own copy of the generators (restored afterwards), because a checkpoint
    taken right before a validation would otherwise miss the draws that validation made. Under
    data parallelism the checkpoint holds rank 0's generators; every rank resumes from them (all
    ranks are seeded alike and make the same draws, see ``quantizers/_utils.broadcast_``).
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_state_to_checkpoint(_collect_rng_states())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied later: between loading and the first step Lightning still builds loaders and may
        # run a sanity check, which must not shift the restored streams.
        self._to_restore = rng_state_from_checkpoint(state_dict)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:
            _set_rng_states(self._to_restore)
            self._to_restore = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # Lightning isolates the sanity check itself
            self._outside_validation = _collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside_validation is not None:
            _set_rng_states(self._outside_validation)
            self._outside_validation = None
