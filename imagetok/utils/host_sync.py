"""Finding the places where training code makes the host wait for the accelerator.

A training step that reads a device value (``.item()``, ``bool(t)``, ``int(t)``), runs an op whose
output size depends on the data (``nonzero``, ``unique``, boolean-mask indexing, ``bincount``) or makes
a blocking copy between host and device, stops the CPU from queueing the next kernels until the GPU has
caught up. :class:`HostSyncRecorder` records these calls at the ATen dispatch level, so it sees them
for CPU tensors too: a CPU test can show that a step would not wait on a GPU. On CUDA it also turns on
``torch.cuda.set_sync_debug_mode("warn")`` and records what the CUDA runtime itself reports.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that return a host value or size their output from the data.
_READS_THE_DEVICE = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "bincount",
                     "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "histc",
                     "argwhere"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


@dataclass
class HostSync:
    """One recorded synchronisation: the ATen op (or "cuda" for the runtime's own report) and the
    innermost imagetok source line that caused it."""

    op: str
    where: str
    innermost: str = ""  # the frames inside that line, innermost first


def _callers() -> tuple[str, str]:
    """The innermost frame in imagetok's own code outside this file, and the frames inside it (in
    other packages), each as ``path:line``."""
    stack = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith("host_sync.py")]
    for depth in range(len(stack) - 1, -1, -1):
        frame = stack[depth]
        if "imagetok" in frame.filename:
            inner = " < ".join(f"{f.filename}:{f.lineno}" for f in reversed(stack[depth + 1:]))
            return f"{frame.filename.split('imagetok', 1)[-1].lstrip('/')}:{frame.lineno}", inner
    return "(outside imagetok)", ""


def _host_side_by_design(inner: str) -> bool:
    """torch's optimisers read their step counters with ``.item()``: those are host tensors on every
    device unless the optimiser is fused or capturable (which keep them on the device and read nothing)."""
    return "/torch/optim/" in inner


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


def _cross_device_blocking_copy(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "_to_copy":
        source, device = args[0], kwargs.get("device")
        return (device is not None and isinstance(source, torch.Tensor) and torch.device(device).type != source.device.type
                and not kwargs.get("non_blocking", False))
    if name == "copy_":
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return dst.device.type != src.device.type and not non_blocking
    return False


class HostSyncRecorder(TorchDispatchMode):
    """``with HostSyncRecorder() as rec: ...`` then ``rec.syncs``: every host synchronisation of the
    code inside (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[HostSync] = []
        self._warnings: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._cuda_mode = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if (name in _READS_THE_DEVICE or (name in _INDEXING and _bool_index(args))
                or _cross_device_blocking_copy(name, args, kwargs)):
            where, innermost = _callers()
            if not _host_side_by_design(innermost):
                self.syncs.append(HostSync(name, where, innermost))
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncRecorder:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
            self._warnings.__exit__(*exc)
            self.syncs += [HostSync("cuda", f"{w.filename}:{w.lineno}") for w in self._caught
                           if "synchroniz" in str(w.message)]
            self._warnings = None
