"""Measuring one training step inside a ``train_step.py`` worker: device sync, peak memory, FLOPs,
the GPU's bf16 peak (for MFU), and the per-repeat figures."""

from __future__ import annotations

import resource
import statistics

# Dense bf16 tensor-core peak (TFLOPS, without sparsity), looked up by a substring of the device name.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
                    ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0)]


def batch_size(case: str, args) -> int:
    if args.batch_size:
        return args.batch_size
    if case in ("default_cpu",) or (case == "vit" and args.device == "cpu"):
        return 16  # the CPU recipes' own batch
    return 32 if args.device == "cuda" else 4


def counts_flops(args) -> bool:
    """FLOPs are counted on CUDA in eager mode; a compiled step has the same FLOPs, which ``--flops-from``
    takes from an eager run's JSON line (FlopCounterMode does not see inside every compiled graph)."""
    return args.device == "cuda" and not args.compile


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


_baseline_mb: float | None = None


def mark_memory_baseline() -> None:
    """Remember the process's peak RSS so far (its imports: the two sides import different libraries),
    so that :func:`step_result` can also report the peak above it."""
    global _baseline_mb
    _baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_name(device: str) -> str | None:
    if device != "cuda":
        return None
    import torch
    return torch.cuda.get_device_name()


def peak_tflops(name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if name and key in name:
            return value
    return None


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_result(times: list[float], batch: int, args, flops: float | None) -> dict:
    """Per-repeat figures from the timed steps' wall times (seconds)."""
    step_s = statistics.median(times)
    out = {"images_per_s": batch / step_s, "step_ms": step_s * 1e3, "step_ms_all": [round(t * 1e3, 2) for t in times],
           "peak_memory_mb": round(peak_memory_mb(args.device), 1)}
    if args.device == "cpu" and _baseline_mb is not None:
        out["peak_memory_above_imports_mb"] = round(out["peak_memory_mb"] - _baseline_mb, 1)
    if args.device == "cuda":
        name = gpu_name(args.device)
        peak = peak_tflops(name)
        out.update(gpu=name, peak_bf16_tflops=peak)
        if flops is not None:
            out.update(flops_per_step=flops, achieved_tflops=flops / step_s / 1e12,
                       mfu=(flops / step_s / (peak * 1e12)) if peak else None)
    return out


class FlopCount:
    """``torch.utils.flop_counter.FlopCounterMode`` entered and left by hand (around one step)."""

    def __init__(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode
        self.mode = FlopCounterMode(display=False)
        self.total: float | None = None

    def start(self) -> None:
        self.mode.__enter__()

    def stop(self) -> None:
        self.mode.__exit__(None, None, None)
        self.total = float(self.mode.get_total_flops())
