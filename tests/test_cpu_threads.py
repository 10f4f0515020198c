"""``cpu_threads``: the torch thread count of a CPU run (a number, or ``auto`` for the cores idle at start)."""

from __future__ import annotations

import os

import pytest
import torch

from imagetok.errors import ConfigValueError
from imagetok.training import run
from imagetok.training.run import busy_cores, set_cpu_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_number_sets_the_threads_and_auto_takes_the_idle_cores(compose_config, monkeypatch):
    set_cpu_threads(compose_config(["cpu_threads=1"]))
    assert torch.get_num_threads() == 1
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run, "busy_cores", lambda: 0.2)
    set_cpu_threads(compose_config([]))
    assert torch.get_num_threads() == cores  # an idle machine: every core
    monkeypatch.setattr(run, "busy_cores", lambda: float(cores + 3))
    set_cpu_threads(compose_config([]))
    assert torch.get_num_threads() == 1  # every core busy with other jobs: one thread


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_value_names_the_key(compose_config, value):
    with pytest.raises(ConfigValueError, match="cpu_threads"):
        set_cpu_threads(compose_config([f"cpu_threads={value}"]))


def test_auto_keeps_omp_num_threads(compose_config, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(run, "busy_cores", lambda: 0.0)
    set_cpu_threads(compose_config([]))
    assert torch.get_num_threads() == 1


def test_busy_cores_reads_a_number_within_the_machine():
    assert 0.0 <= busy_cores(0.05) <= os.cpu_count()
