"""Measuring helpers shared by the benchmark scripts: one case per subprocess (so that the peak
resident set belongs to that case alone), peak-RSS growth, median wall time, and an address-space
cap that turns "would need tens of GiB" into a quick, reported failure instead of an exhausted machine.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def peak_rss_mb() -> float:
    """Peak resident set of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` unmeasured ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cap_address_space(extra_gib: float) -> None:
    """Let this process map at most ``extra_gib`` GiB more than it has mapped now, so an allocation
    beyond it raises (torch: ``RuntimeError: ... not enough memory``) instead of swapping or
    triggering the OOM killer on a shared machine. Call after the heavy imports."""
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm_kib * 1024 + int(extra_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_in_subprocess(script: str, args: list[str], timeout_s: float | None = None) -> dict:
    """Run ``python script *args`` and return the JSON object on the last line of its stdout; if the
    case fails (error, time limit), return ``{"error": <last line of stderr or the reason>}``."""
    try:
        out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = out.stderr.strip().splitlines()
    return {"error": err[-1][:300] if err else f"exit status {out.returncode}"}
