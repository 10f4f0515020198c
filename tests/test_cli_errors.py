"""Bad files through every entry point: one ``error:`` line and exit code 2, never a traceback (issue 19).

The entry points' ``main`` functions run in-process with a patched ``sys.argv`` (the same Hydra parsing
and error handling as the console scripts, without paying the interpreter start-up per case); one case
runs as a real subprocess to show the console output end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # as `truncate -s 50%`
    text = tmp_path / "text.ckpt"
    text.write_text("hello\n")
    return {"truncated": truncated, "text": text}


def _entry_points():
    from imagetok import fit_quantizer, tokenize_dataset
    from imagetok.cli import evaluate, export, train

    return {"train": train.main, "evaluate": evaluate.main, "export": export.main,
            "fit_quantizer": fit_quantizer.main, "tokenize_dataset": tokenize_dataset.main}


def _run_in_process(monkeypatch, capsys, entry: str, args: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", [entry, *args])
    with pytest.raises(SystemExit) as exited:
        _entry_points()[entry]()
    out = capsys.readouterr()
    assert exited.value.code == 2, out.out + out.err
    return out.out + out.err


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error:" in line]


@pytest.mark.parametrize("kind", ["truncated", "text"])
@pytest.mark.parametrize("entry", ["train", "evaluate", "export", "fit_quantizer"])
def test_unreadable_checkpoint_is_one_line_in_every_entry_point(tmp_path, monkeypatch, capsys, entry, kind):
    bad = _bad_checkpoints(tmp_path)[kind]
    key = "resume" if entry == "train" else "checkpoint"
    args = [f"{key}={bad}", f"hydra.run.dir={tmp_path / 'run'}"]
    if entry in ("export", "fit_quantizer"):
        args = [f"{key}={bad}", f"out={tmp_path / 'out'}"]
    output = _run_in_process(monkeypatch, capsys, entry, args)
    (line,) = _error_lines(output)
    assert f"{bad} is not a readable checkpoint" in line
    assert "Traceback" not in output and "KeyError" not in output.replace("unpickling failed (KeyError", "")
    assert not (tmp_path / "out" / "model.safetensors").exists()  # Hydra made the directory; nothing was written


def test_from_checkpoint_raises_the_documented_exception(tmp_path):
    from imagetok import Tokenizer
    from imagetok.errors import CheckpointError

    for bad in _bad_checkpoints(tmp_path).values():
        with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
            Tokenizer.from_checkpoint(bad)


@pytest.mark.parametrize("entry,args,missing", [
    ("export", ["checkpoint=x.ckpt"], "out"),
    ("tokenize_dataset", ["pretrained=somewhere"], "out"),
    ("fit_quantizer", ["out=somewhere"], "checkpoint"),
    ("evaluate", [], "checkpoint"),
])
def test_a_missing_required_value_is_one_line(tmp_path, monkeypatch, capsys, entry, args, missing):
    monkeypatch.chdir(tmp_path)
    output = _run_in_process(monkeypatch, capsys, entry, args)
    (line,) = _error_lines(output)
    assert f"{missing} is required and was not given: add {missing}=... to the command line" in line
    assert "Traceback" not in output and "MissingMandatoryValue" not in output


@pytest.mark.parametrize("value", ["-1", "many", "2.5"])
def test_a_bad_token_language_cap_is_one_line(tmp_path, monkeypatch, capsys, value):
    output = _run_in_process(monkeypatch, capsys, "evaluate", [f"checkpoint={tmp_path / 'never-read.ckpt'}",
                                                               f"eval.token_language_max_images={value}",
                                                               f"hydra.run.dir={tmp_path / 'run'}"])
    (line,) = _error_lines(output)
    assert "eval.token_language_max_images=" in line and value in line
    assert "null (every image), 0 (no token-language statistics) or an integer >= 1" in line and "Traceback" not in output


def test_corrupt_pretrained_weights_are_one_line(tmp_path, monkeypatch, capsys):
    from imagetok import Tokenizer

    out = _tiny_tokenizer().save_pretrained(tmp_path / "pre")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    output = _run_in_process(monkeypatch, capsys, "tokenize_dataset",
                             [f"pretrained={out}", f"out={tmp_path / 'tokens'}", "num_images=2"])
    (line,) = _error_lines(output)
    assert "model.safetensors" in line and "Traceback" not in output
    with pytest.raises(Exception) as raised:
        Tokenizer.from_pretrained(out)
    assert type(raised.value).__name__ == "CheckpointError"


def _tiny_tokenizer():
    from imagetok import Tokenizer

    config = {"encoder": {"_target_": "imagetok.nets.cnn.Encoder", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                          "attn_resolutions": [], "z_channels": 4},
              "quantizer": {"_target_": "imagetok.quantizers.vq.VectorQuantizer", "codebook_size": 16, "dim": 4},
              "decoder": {"_target_": "imagetok.nets.cnn.Decoder", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                          "attn_resolutions": [], "z_channels": 4}}
    return Tokenizer.from_config(config)


def test_console_prints_one_line_for_a_truncated_checkpoint(tmp_path):
    """The same as above, end to end through a real process: what a user sees on the terminal."""
    bad = _bad_checkpoints(tmp_path)["truncated"]
    proc = subprocess.run([sys.executable, "export.py", f"checkpoint={bad}", f"out={tmp_path / 'out'}"], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, IMAGETOK_OFFLINE="1"), timeout=120)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).strip().splitlines() == [
        f"error: {bad} is not a readable checkpoint (truncated, or not a file torch.save wrote): PytorchStreamReader "
        "failed reading zip archive: failed finding central directory"]


def test_resume_takes_the_checkpoints_settings_and_refuses_another_architecture(tmp_path, monkeypatch, capsys):
    from test_train_variants import SAMPLE, TINY

    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train", *TINY, *SAMPLE, "quantizer.codebook_size=64", "trainer.max_steps=2",
                                      "checkpoint.every_n_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={run}"])
    _entry_points()["train"]()
    last = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()

    # Only the new step budget: the tiny architecture, batch and intervals come from the checkpoint.
    monkeypatch.setattr(sys, "argv", ["train", f"resume={last}", "trainer.max_steps=4", f"hydra.run.dir={run}"])
    _entry_points()["train"]()
    output = capsys.readouterr()
    assert "resuming with the settings from the checkpoint; this command changes trainer.max_steps 2 -> 4" in output.out + output.err
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert "every_n_steps: 2" in (run / "config.yaml").read_text()

    output = _run_in_process(monkeypatch, capsys, "train", [f"resume={last}", "trainer.max_steps=6", "quantizer=fsq",
                                                            f"hydra.run.dir={run}"])
    (line,) = _error_lines(output)
    assert "the checkpoint was trained with another architecture" in line and "quantizer._target_" in line
