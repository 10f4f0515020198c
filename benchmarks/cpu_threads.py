"""Training speed on the CPU against the number of torch threads (``cpu_threads``), one JSON line per run.

    python benchmarks/cpu_threads.py [--threads 1 2] [--steps 60] [--repeats 3] [-- extra overrides]

Each run is ``python train.py trainer.max_steps=<steps> cpu_threads=<n> ~logger`` (the default
recipe on the embedded sample data) in a fresh process; the figure is the run's own ``train_seconds``
from ``metrics.json`` (the fit loop, without start-up), as steps per second. Thread counts alternate
within each repeat, so a change in the machine's load hits every count alike; the spread over repeats
is printed with the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps_per_second(threads: int, steps: int, extra: list[str], run_dir: Path) -> float:
    command = [sys.executable, "train.py", f"trainer.max_steps={steps}", f"cpu_threads={threads}", "~logger",
               f"trainer.val_check_interval={steps}", f"checkpoint.every_n_steps={steps}", *extra,
               f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, IMAGETOK_OFFLINE="1")
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return steps / json.loads((run_dir / "metrics.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more train.py overrides")
    args = parser.parse_args()
    rates: dict[int, list[float]] = {n: [] for n in args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n in args.threads:
                rates[n].append(steps_per_second(n, args.steps, args.extra, Path(tmp) / f"{n}_{repeat}"))
    base = statistics.median(rates[args.threads[0]])
    for n, values in rates.items():
        median = statistics.median(values)
        print(json.dumps({"cpu_threads": n, "steps": args.steps, "steps_per_s_median": round(median, 3),
                          "steps_per_s_min": round(min(values), 3), "steps_per_s_max": round(max(values), 3),
                          f"ratio_to_{args.threads[0]}_thread": round(median / base, 3),
                          "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
