"""Shared fixtures: compose the Hydra config tree the way train.py does, with test overrides."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test downloads weights or sees a developer's torch cache."""
    monkeypatch.setenv("IMAGETOK_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def compose_config() -> Callable[[Sequence[str]], DictConfig]:
    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            return compose("train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()
