"""Resuming a run: which settings come from the checkpoint, and what a killed run left behind.

A resumed run is the checkpoint's run continued. Every setting the command does not change comes from
the checkpoint's own (resolved) config, so ``python train.py resume=D/checkpoints/last.ckpt`` is enough to
continue a ``cpu_rq`` run with its ``checkpoint.every_n_steps``. The settings a command does change win,
and are named in one line; a change to the architecture (encoder, quantizer, decoder) cannot continue a
run and is refused in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from imagetok.errors import CheckpointError

log = logging.getLogger(__name__)

ARCHITECTURE = ("encoder", "quantizer", "decoder")
# Where to resume from is this command's business, never the checkpoint's.
NOT_FROM_CHECKPOINT = ("resume", "resume_search_dir")
_ABSENT = object()


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested dict; lists count as one value."""
    if not isinstance(node, dict):
        return {prefix: node}
    if not node and prefix:
        return {prefix: {}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[last] = value


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree


def _delete(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree.pop(last, None)


def _show(value: Any) -> str:
    return "(unset)" if value is _ABSENT else str(value)


def resume_config(cfg: DictConfig, saved: dict[str, Any], defaults: DictConfig | None = None) -> tuple[DictConfig, list[str]]:
    """The config a resumed run trains with, and the settings in which it differs from the checkpoint.

    Args:
        cfg: this command's config (defaults + its overrides).
        saved: the checkpoint's resolved run config (``hyper_parameters["config"]``).
        defaults: the config without any of the command's overrides. Given (the CLI), every setting the
            command did not change is taken from ``saved``; None (the Python API), ``cfg`` wins in full.

    Returns:
        ``(config, differences)``: differences read ``"key old -> new"``, sorted by key.

    Raises:
        CheckpointError: the encoder, quantizer or decoder differ from the checkpoint's.
    """
    now = _leaves(OmegaConf.to_container(cfg, resolve=True))
    old = _leaves(saved)
    if defaults is None:
        changed = set(now)
    else:
        base = _leaves(OmegaConf.to_container(defaults, resolve=True))
        changed = {k for k in now.keys() | base.keys() if now.get(k, _ABSENT) != base.get(k, _ABSENT)}
    own = {k for k in now.keys() | old.keys() if k.split(".")[0] in NOT_FROM_CHECKPOINT}

    merged = OmegaConf.to_container(cfg, resolve=False)
    for key, value in old.items():
        if key in changed or key in own:
            continue
        current = _get(merged, key)
        # An interpolation follows the settings it refers to, which now come from the checkpoint.
        if not (isinstance(current, str) and "${" in current):
            _set(merged, key, value)
    for key in now.keys() - old.keys() - changed - own:
        _delete(merged, key)

    differences = [f"{k} {_show(old.get(k, _ABSENT))} -> {_show(now.get(k, _ABSENT))}" for k in sorted(changed - own)
                   if now.get(k, _ABSENT) != old.get(k, _ABSENT)]
    architecture = [d for d in differences if d.split(".")[0] in ARCHITECTURE]
    if architecture:
        shown = "; ".join(architecture[:4]) + (f"; and {len(architecture) - 4} more" if len(architecture) > 4 else "")
        raise CheckpointError(f"resume: the checkpoint was trained with another architecture ({shown}); drop these "
                              "overrides to continue that run, or start a new run in another directory")
    config = OmegaConf.create(merged)
    OmegaConf.set_struct(config, True)
    return config, differences


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``*.tmp`` files a killed checkpoint or metrics write left in ``folder``; the removed paths."""
    stale = sorted(folder.glob("*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def step_checkpoints(folder: Path) -> list[Path]:
    """The ``stepNNNNNN.ckpt`` files in ``folder``, oldest step first."""
    return sorted((p for p in folder.glob("step*.ckpt") if p.stem[4:].isdigit()), key=lambda p: int(p.stem[4:]))


def prune_step_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Keep the ``keep`` newest ``stepNNNNNN.ckpt`` files in ``folder`` (by step; ``last.ckpt`` is never
    touched) and delete older ones, which a killed run's successor does not know about; the deleted paths."""
    steps = step_checkpoints(folder)
    # keep=-1 keeps them all (ModelCheckpoint's save_top_k=-1); keep=0 keeps only last.ckpt
    old = [] if keep < 0 else steps[:max(0, len(steps) - keep)]
    for path in old:
        path.unlink(missing_ok=True)
    return old


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose step checkpoint, at a step that also validates, is written after that
    validation (Lightning's own deferral to ``on_validation_end``) instead of before it. A run killed
    between the two would otherwise resume past a validation it never ran: no figures, no row in the
    CSV, no reconstruction grid for that step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
