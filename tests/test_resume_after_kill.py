"""Kill -9 a training process at a random moment after its first checkpoint, resume it, and compare with
a run that was never interrupted: the CSV log has every step once (the same rows, bitwise the same
values), the checkpoint folder holds what ``checkpoint.keep`` says and no ``.tmp`` files, and the final
weights are bitwise equal. The resumed command repeats only ``trainer.max_steps`` and the run directory,
as a user would; every other setting comes from the checkpoint's config."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT
from test_resume import _assert_same

STEPS, EVERY, KEEP = 24, 4, 2
# Settings the resume command does not repeat: they must come back from the checkpoint.
SETTINGS = ["encoder.ch=8", "encoder.z_channels=8", "encoder.ch_mult=[1,2]", "data.image_size=16",
            "data.batch_size=4", "data.val_batch_size=4", "data.val_samples=4", "loss.discriminator.ch=8",
            "quantizer.codebook_size=64", "loss.disc_start=6", "optim.warmup_steps=2",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=8",
            f"checkpoint.every_n_steps={EVERY}", f"checkpoint.keep={KEEP}"]


def _command(run_dir, *extra):
    return [sys.executable, "train.py", *extra, f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}"]


def _env():
    return dict(os.environ, IMAGETOK_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(command):
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _kill_after_first_checkpoint(run_dir, delay: float) -> int:
    """Start the run, SIGKILL it ``delay`` seconds after its first step checkpoint; the step it had saved."""
    proc = subprocess.Popen(_command(run_dir, *SETTINGS), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir / "checkpoints" / "last.ckpt"  # written right after the first step checkpoint
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def _rows(run_dir):
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _seconds_per_step(run_dir) -> float:
    """From the uninterrupted run: the time between its last two step checkpoints over the steps between."""
    first, last = (run_dir / "checkpoints" / f"step{s:06d}.ckpt" for s in (STEPS - EVERY, STEPS))
    return max(last.stat().st_mtime - first.stat().st_mtime, 1e-3) / EVERY


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_command(straight, *SETTINGS))
    # a random moment within the first 80% of what is left after the first checkpoint, on this machine
    delay = random.uniform(0.0, min(1.0, 0.8 * (STEPS - EVERY) * _seconds_per_step(straight)))
    saved_step = _kill_after_first_checkpoint(killed, delay)
    assert EVERY <= saved_step < STEPS, (delay, saved_step)
    output = _run(_command(killed, f"resume={killed / 'checkpoints' / 'last.ckpt'}"))
    assert "resuming from" in output and "settings from the checkpoint" in output, output[-2000:]
    assert f"{STEPS}/{STEPS} [" in output  # the progress bar counts the run's steps, also after the resume

    rows_straight, rows_resumed = _rows(straight), _rows(killed)
    steps = [int(r["step"]) for r in rows_resumed if r.get("train/total")]
    assert steps == sorted(set(steps)), f"killed after {delay:.2f}s at step {saved_step}: steps {steps}"
    assert rows_resumed == rows_straight, f"killed after {delay:.2f}s at step {saved_step}"

    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    expected = sorted(["last.ckpt", *(f"step{s:06d}.ckpt" for s in range(STEPS - EVERY * (KEEP - 1), STEPS + 1, EVERY))])
    assert names == expected == sorted(p.name for p in (straight / "checkpoints").iterdir())

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    _assert_same(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
