"""``export.py from=auto|taming|llamagen`` through the entry point: the format is detected and named in
one log line; a file that is none of them, or another project's under an explicit ``from=``, is one
``error:`` line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foreign_checkpoints import llamagen_state, taming_state
from imagetok import Tokenizer
from imagetok.export.converters import convert_llamagen, convert_taming
from test_cli_errors import ROOT, _entry_points, _error_lines, _run_in_process

LOOKED_FOR = ("imagetok: {\"state_dict\": ..., \"hyper_parameters\": {\"tokenizer_config\": ...}}, as train.py writes",
              "llamagen: {\"ema\": ...} or {\"model\": ...} or a bare state dict with quantize.embedding.weight, "
              "encoder.conv_in.weight, encoder.conv_blocks.*, decoder.conv_blocks.*",
              "taming: {\"state_dict\": ...} or a bare state dict with quantize.embedding.weight, encoder.conv_in.weight, "
              "encoder.down.*, decoder.up.*, without quantize.quant_resi.*, quantize.ema_vocab_hit_SV, "
              "model_ema.quantizeembeddingweight",
              "var: {\"state_dict\": ...} or {\"model\": ...} or a bare state dict with quantize.embedding.weight, "
              "encoder.conv_in.weight, encoder.down.*, and quantize.quant_resi.* or quantize.ema_vocab_hit_SV")


def _files(tmp_path: Path) -> dict[str, Path]:
    """One file of each kind the converters meet: checkpoints of both projects, and things that are not."""
    files = {name: tmp_path / f"{name}.pt" for name in ("taming", "llamagen", "unrelated", "tensor", "broken_taming")}
    torch.save({"state_dict": taming_state(), "global_step": 3}, files["taming"])
    torch.save({"model": llamagen_state(), "steps": 3}, files["llamagen"])
    torch.save({"foo": torch.zeros(2)}, files["unrelated"])
    torch.save(torch.zeros(2), files["tensor"])
    broken = {k: v for k, v in taming_state().items() if not k.startswith("decoder.up.0.block.0.")}
    torch.save({"state_dict": broken}, files["broken_taming"])
    files["text"] = tmp_path / "notes.txt"
    files["text"].write_text("hello\n")
    files["directory"] = tmp_path / "a_save_pretrained_dir"
    files["directory"].mkdir()
    return files


def _export_error(monkeypatch, capsys, tmp_path: Path, source: str, file: Path) -> str:
    output = _run_in_process(monkeypatch, capsys, "export", [f"from={source}", f"checkpoint={file}",
                                                              f"out={tmp_path / 'out'}"])
    (line,) = _error_lines(output)
    assert "Traceback" not in output and not (tmp_path / "out" / "model.safetensors").exists()
    return line


@pytest.mark.parametrize("source", ["taming", "llamagen", "auto"])
def test_a_text_file_or_a_directory_is_one_line_under_every_source(tmp_path, monkeypatch, capsys, source):
    files = _files(tmp_path)
    line = _export_error(monkeypatch, capsys, tmp_path, source, files["text"])
    assert f"error: {files['text']} is not a readable checkpoint (truncated, or not a file torch.save wrote): " in line
    line = _export_error(monkeypatch, capsys, tmp_path, source, files["directory"])
    assert f"error: {files['directory']} is a directory, not a checkpoint file" in line


@pytest.mark.parametrize("source,wrong", [("taming", "llamagen"), ("llamagen", "taming")])
def test_another_projects_or_an_unrelated_checkpoint_under_an_explicit_source_is_one_line(
        tmp_path, monkeypatch, capsys, source, wrong):
    files = _files(tmp_path)
    needs = next(text for text in LOOKED_FOR if text.startswith(f"{source}: ")).split(": ", 1)[1]
    line = _export_error(monkeypatch, capsys, tmp_path, source, files[wrong])
    assert line.endswith(f"error: {files[wrong]} is not a {source} checkpoint (from={source} needs {needs}); "
                         f"it looks like a {wrong} checkpoint: use from={wrong} (or from=auto)")
    line = _export_error(monkeypatch, capsys, tmp_path, source, files["unrelated"])
    assert line.endswith(f"is not a {source} checkpoint (from={source} needs {needs}); its tensors are [foo]")
    line = _export_error(monkeypatch, capsys, tmp_path, source, files["tensor"])
    assert line.endswith("; it holds a Tensor, not a dict")


def test_auto_refuses_what_no_format_fits_naming_every_format_and_its_keys(tmp_path, monkeypatch, capsys):
    files = _files(tmp_path)
    for kind, found in (("unrelated", "its tensors are [foo]"), ("tensor", "it holds a Tensor, not a dict")):
        line = _export_error(monkeypatch, capsys, tmp_path, "auto", files[kind])
        assert line.endswith(f"error: {files[kind]} is in none of the checkpoint formats from=auto knows "
                             f"({'; '.join(LOOKED_FOR)}); {found}")


def test_a_detected_checkpoint_missing_a_tensor_is_one_line(tmp_path, monkeypatch, capsys):
    files = _files(tmp_path)
    for source in ("taming", "auto"):
        line = _export_error(monkeypatch, capsys, tmp_path, source, files["broken_taming"])
        assert line.endswith(f"error: {files['broken_taming']} (taming): no tensor decoder.up.0.block.0.conv1.weight, "
                             "which the decoder needs")


@pytest.mark.parametrize("layout", ["taming", "llamagen"])
def test_auto_detects_each_layout_says_so_and_converts_as_the_explicit_source(tmp_path, monkeypatch, capsys, layout):
    files = _files(tmp_path)
    monkeypatch.setattr(sys, "argv", ["export", "from=auto", f"checkpoint={files[layout]}", f"out={tmp_path / 'out'}"])
    _entry_points()["export"]()
    output = capsys.readouterr()
    lines = [line for line in (output.out + output.err).splitlines() if "from=auto" in line]
    assert lines == [f"from=auto: {files[layout]} is a checkpoint in the {layout} format"]
    expected = (convert_taming({"state_dict": taming_state()}) if layout == "taming"
                else convert_llamagen({"model": llamagen_state()}))
    converted = Tokenizer.from_pretrained(tmp_path / "out")
    assert converted.config == expected.config
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in converted.state_dict().items())


def test_console_prints_one_line_for_a_checkpoint_of_no_known_format(tmp_path):
    """End to end through a real process: what a user sees on the terminal."""
    unrelated = _files(tmp_path)["unrelated"]
    proc = subprocess.run([sys.executable, "export.py", "from=auto", f"checkpoint={unrelated}", f"out={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, IMAGETOK_OFFLINE="1"), timeout=120)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).strip().splitlines() == [
        f"error: {unrelated} is in none of the checkpoint formats from=auto knows ({'; '.join(LOOKED_FOR)}); "
        "its tensors are [foo]"]
