"""Loggers from the ``logger`` config group: CSV by default, TensorBoard and Weights & Biases (offline),
several at once, and one logger run per job under 2-process DDP (only rank 0 writes)."""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT
from imagetok.errors import ConfigValueError
from imagetok.training.loggers import WandbLogger, build_loggers
from imagetok.training.run import train
from test_train_variants import SAMPLE, TINY

RUN = [*TINY, *SAMPLE, "trainer.max_steps=3", "trainer.val_check_interval=3", "loss.disc_start=1"]


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """W&B offline and silent, with every file it writes kept inside the test's tmp_path."""
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home))
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file: a 7-byte file header, then LevelDB-style
    log blocks of 32 KiB whose chunks each carry a 7-byte header (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _key(item) -> str:
    """A history or config item's key: ``key``, or (newer wandb) the parts of ``nested_key``."""
    return item.key or "/".join(item.nested_key)


def test_logger_group_selects_csv_by_default_several_or_none(compose_config, tmp_path):
    assert list(compose_config().logger) == ["csv"]
    assert list(compose_config(["logger=[csv,tensorboard,wandb]"]).logger) == ["csv", "tensorboard", "wandb"]
    assert build_loggers(compose_config(["~logger"]), tmp_path) == []
    csv, tensorboard = build_loggers(compose_config(["logger=[csv,tensorboard]"]), tmp_path)
    assert isinstance(csv, CSVLogger) and isinstance(tensorboard, TensorBoardLogger)
    assert Path(csv.log_dir) == tmp_path / "logs" and Path(tensorboard.log_dir) == tmp_path / "tensorboard"
    csv.save()  # the run config went in as hyperparameters
    assert yaml.safe_load((tmp_path / "logs" / "hparams.yaml").read_text())["optim"]["lr"] == 8.0e-4


def test_a_logger_that_is_not_a_logger_names_its_key(compose_config, tmp_path):
    with pytest.raises(ConfigValueError, match=r"logger\.csv\._target_"):
        build_loggers(compose_config(["logger.csv._target_=collections.OrderedDict"]), tmp_path)


def test_wandb_goes_offline_without_credentials_and_keeps_one_id_per_run_dir(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    first, again = WandbLogger(save_dir=str(tmp_path / "a")), WandbLogger(save_dir=str(tmp_path / "a"))
    assert first._offline and first.version == again.version != WandbLogger(save_dir=str(tmp_path / "b")).version
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not WandbLogger(save_dir=str(tmp_path / "a"))._offline
    assert WandbLogger(save_dir=str(tmp_path / "a"), offline=True)._offline


def test_tensorboard_and_wandb_offline_get_scalars_config_and_reconstructions(compose_config, tmp_path, wandb_env):
    cfg = compose_config([*RUN, "logger=[csv,tensorboard,wandb]", "logger.wandb.tags=[test]"])
    run = train(cfg, tmp_path / "run")
    assert run.trainer.global_step == 3
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()  # the default CSV files are unchanged

    events = glob.glob(str(tmp_path / "run" / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1
    tb = EventAccumulator(events[0], size_guidance={"images": 0, "scalars": 0})
    tb.Reload()
    assert {"train/total", "train/disc", "val/psnr"} <= set(tb.Tags()["scalars"])
    [image] = tb.Images("val/reconstructions")
    assert image.step == 3 and image.width > image.height > 0  # a row of originals above their reconstructions

    [wandb_run] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert not list(wandb_env.glob("**/*.wandb"))  # nothing outside the run directory
    records = wandb_records(next(wandb_run.glob("run-*.wandb")))
    history = [{_key(item): item.value_json for item in r.history.item} for r in records if r.HasField("history")]
    assert any("train/total" in row for row in history) and any("val/psnr" in row for row in history)
    assert any(row.get("val/reconstructions/_type") == '"images/separated"' for row in history)
    assert list(wandb_run.glob("files/media/images/val/reconstructions_3_*.png"))
    config = {_key(item) for r in records if r.HasField("config") for item in r.config.update}
    assert {"encoder", "quantizer", "optim", "loss"} <= config  # the resolved run config
    [run_record] = [r.run for r in records if r.HasField("run")]
    assert run_record.project == "imagetok" and list(run_record.tags) == ["test"]


def test_two_process_job_writes_one_tensorboard_and_one_wandb_run(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    overrides = [*RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.devices=2",
                 "logger=[tensorboard,wandb]", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*/files/media/images/val/*.png"))) == 1  # rank 0 only
