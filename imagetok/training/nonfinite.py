"""Non-finite loss terms and gradient norms, found without a host synchronisation per step.

``optim.nonfinite=stop`` (the default) does not need to know before an update whether its loss was
finite: the run stops either way and never checkpoints the result. So the checks of a step are only
*queued* (:meth:`DeferredFiniteChecks.add`): one device-side ``all`` over the step's values, one
all-reduce (MIN) over the ranks, and an asynchronous copy to pinned host memory. They are read one
step later (:meth:`DeferredFiniteChecks.raise_if_nonfinite` with ``before_step``), when the GPU has
long finished them, so the CPU keeps running ahead of the GPU. Every rank reads at the same step and
sees the same reduced flags, so all ranks stop alike. Before a checkpoint, a validation or the end of
training everything queued is read (``before_step=None``), so a checkpoint is never written after a
non-finite step.

``optim.nonfinite=skip`` must know before the update; it reads one flag per network per step
(``TokenizerTrainingModule._step``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


def nonfinite_names(terms: Mapping[str, float | torch.Tensor]) -> list[str]:
    """The keys of ``terms`` (scalars) whose values are NaN or infinite."""
    return [k for k, v in terms.items() if not math.isfinite(float(v))]


def all_ranks_min(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (int tensor) reduced with MIN over the ranks when distributed; enqueued, not waited for
    (NCCL), so no host sync."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags


def nonfinite_error(bad: list[str], step: int) -> FloatingPointError:
    return FloatingPointError(f"non-finite loss term(s) {bad or 'on another rank'} at generator step {step}; "
                              "the last saved checkpoint is untouched")


@dataclass
class _Queued:
    step: int
    groups: list[dict[str, torch.Tensor]]  # detached scalars, only looked at when a flag is down
    flags: torch.Tensor  # [len(groups)] int32 on the host (pinned on CUDA): 1 = every rank finite
    ready: torch.cuda.Event | None  # recorded after the copy on CUDA; None on CPU


class DeferredFiniteChecks:
    """Checks of loss terms queued during a step and read later (see the module docstring)."""

    def __init__(self) -> None:
        self._open: list[dict[str, torch.Tensor]] = []  # this step's groups, not queued yet
        self._queued: list[_Queued] = []

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        """Check ``values`` (scalar tensors: loss terms, or a gradient norm) with this step."""
        if values:
            self._open.append({k: v.detach() for k, v in values.items()})

    def end_step(self, step: int, device: torch.device) -> None:
        """Queue this step's groups: one flag per group, reduced over ranks, copied to the host."""
        if not self._open:
            return
        flags = torch.stack([torch.isfinite(torch.stack([v.float().reshape(()).to(device) for v in g.values()])).all()
                             for g in self._open]).int()
        flags = all_ranks_min(flags)
        ready = None
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            flags = host
        self._queued.append(_Queued(step, self._open, flags, ready))
        self._open = []

    def raise_if_nonfinite(self, before_step: int | None = None) -> None:
        """Read the queued checks of steps before ``before_step`` (all of them when None) and raise
        ``FloatingPointError`` naming the first non-finite group's terms and its generator step (or
        "on another rank" when only another rank's values were not finite)."""
        while self._queued and (before_step is None or self._queued[0].step < before_step):
            queued = self._queued.pop(0)
            if queued.ready is not None:
                queued.ready.synchronize()
            for ok, group in zip(queued.flags.tolist(), queued.groups):
                if not ok:
                    self._queued.clear()
                    raise nonfinite_error(nonfinite_names(group), queued.step)
