"""``export.py from=auto|taming|llamagen|var|magvit2|diffusers|titok`` through the entry point: the format is detected
and named in one log line; a file that is none of them, or another project's under an explicit
``from=``, is one ``error:`` line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from foreign_checkpoints import (diffusers_vq_directory, diffusers_vq_state, ibq_checkpoint, lfq_checkpoint, llamagen_state,
                                 taming_state, titok_state, var_state, var_tokenizer)
from imagetok import Tokenizer
from imagetok.export.converters import (FORMATS, convert_diffusers, convert_llamagen, convert_magvit2, convert_taming,
                                        convert_titok, convert_var)
from imagetok.export.converters.var import VAR_SCALES
from test_cli_errors import ROOT, _entry_points, _error_lines, _run_in_process

LOOKED_FOR = ("diffusers: a diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors) or its "
              "weights file, with encoder.conv_in.weight, encoder.down_blocks.*, decoder.up_blocks.*, quantize.embedding.weight",
              "imagetok: {\"state_dict\": ..., \"hyper_parameters\": {\"tokenizer_config\": ...}}, as train.py writes",
              "llamagen: {\"ema\": ...} or {\"model\": ...} or a bare state dict with quantize.embedding.weight, "
              "encoder.conv_in.weight, encoder.conv_blocks.*, decoder.conv_blocks.*",
              "magvit2: {\"state_dict\": ...} or a bare state dict with encoder.mid_block.0.conv1.weight and "
              "decoder.adaptive.0.gamma.weight (Open-MAGVIT2), or quantize.embedding.weight, "
              "encoder.down.0.block.0.conv1.weight and model_ema.quantizeembeddingweight (IBQ; without EMA weights: "
              "config=<its SEED-Voken yaml>)",
              "taming: {\"state_dict\": ...} or a bare state dict with quantize.embedding.weight, encoder.conv_in.weight, "
              "encoder.down.*, decoder.up.*, without quantize.quant_resi.*, quantize.ema_vocab_hit_SV, "
              "model_ema.quantizeembeddingweight",
              "titok: {\"state_dict\": ...} or {\"model\": ...} or a bare state dict with latent_tokens, "
              "encoder.patch_embed.weight, encoder.latent_token_positional_embedding, "
              "decoder.latent_token_positional_embedding",
              "var: {\"state_dict\": ...} or {\"model\": ...} or a bare state dict with quantize.embedding.weight, "
              "encoder.conv_in.weight, encoder.down.*, and quantize.quant_resi.* or quantize.ema_vocab_hit_SV")


# the format each test file is in (an IBQ checkpoint is SEED-Voken's: from=magvit2)
FORMAT_OF = {"taming": "taming", "llamagen": "llamagen", "var": "var", "magvit2": "magvit2", "ibq": "magvit2",
             "diffusers": "diffusers", "titok": "titok"}


def _var_checkpoint() -> dict:
    return var_state(var_tokenizer(scales=VAR_SCALES))  # a bare state dict, as VAR releases it


def _files(tmp_path: Path) -> dict[str, Path]:
    """One file of each kind the converters meet: checkpoints of each project, and things that are not."""
    names = ("taming", "llamagen", "var", "magvit2", "ibq", "ibq_no_ema", "titok", "unrelated", "tensor", "broken_taming")
    files = {name: tmp_path / f"{name}.pt" for name in names}
    torch.save({"state_dict": taming_state(), "global_step": 3}, files["taming"])
    torch.save({"model": llamagen_state(), "steps": 3}, files["llamagen"])
    torch.save(_var_checkpoint(), files["var"])
    torch.save(lfq_checkpoint(), files["magvit2"])
    torch.save(ibq_checkpoint(), files["ibq"])
    torch.save(ibq_checkpoint(ema=False), files["ibq_no_ema"])
    torch.save(titok_state(), files["titok"])  # bare, as the tokenizer_titok_*.bin releases
    files["ibq_yaml"] = tmp_path / "imagenet_ibqgan_64.yaml"
    files["ibq_yaml"].write_text(yaml.safe_dump(
        {"model": {"class_path": "src.IBQ.models.ibqgan.IBQ", "init_args": {"n_embed": 64, "embed_dim": 8}}}))
    torch.save({"foo": torch.zeros(2)}, files["unrelated"])
    torch.save(torch.zeros(2), files["tensor"])
    broken = {k: v for k, v in taming_state().items() if not k.startswith("decoder.up.0.block.0.")}
    torch.save({"state_dict": broken}, files["broken_taming"])
    files["text"] = tmp_path / "notes.txt"
    files["text"].write_text("hello\n")
    files["directory"] = tmp_path / "a_save_pretrained_dir"
    files["directory"].mkdir()
    files["diffusers"] = diffusers_vq_directory(tmp_path / "vqvae")  # a directory, as diffusers publishes it
    return files


def _export_error(monkeypatch, capsys, tmp_path: Path, source: str, file: Path, *extra: str) -> str:
    output = _run_in_process(monkeypatch, capsys, "export", [f"from={source}", f"checkpoint={file}",
                                                              f"out={tmp_path / 'out'}", *extra])
    (line,) = _error_lines(output)
    assert "Traceback" not in output and not (tmp_path / "out" / "model.safetensors").exists()
    return line


@pytest.mark.parametrize("source", ["taming", "llamagen", "var", "magvit2", "diffusers", "titok", "auto"])
def test_a_text_file_or_a_directory_is_one_line_under_every_source(tmp_path, monkeypatch, capsys, source):
    files = _files(tmp_path)
    line = _export_error(monkeypatch, capsys, tmp_path, source, files["text"])
    assert f"error: {files['text']} is not a readable checkpoint (truncated, or not a file torch.save wrote): " in line
    line = _export_error(monkeypatch, capsys, tmp_path, source, files["directory"])
    assert f"error: {files['directory']} is a directory, not a checkpoint file" in line


@pytest.mark.parametrize("source,wrong", [("taming", "llamagen"), ("llamagen", "taming"), ("var", "taming"),
                                          ("taming", "var"), ("magvit2", "taming"), ("taming", "ibq"),
                                          ("magvit2", "var"), ("var", "magvit2"), ("taming", "diffusers"),
                                          ("diffusers", "taming"), ("diffusers", "llamagen"), ("taming", "titok"),
                                          ("titok", "taming")])
def test_another_projects_or_an_unrelated_checkpoint_under_an_explicit_source_is_one_line(
        tmp_path, monkeypatch, capsys, source, wrong):
    files = _files(tmp_path)
    needs = next(text for text in LOOKED_FOR if text.startswith(f"{source}: ")).split(": ", 1)[1]
    line = _export_error(monkeypatch, capsys, tmp_path, source, files[wrong])
    found = FORMAT_OF[wrong]
    assert line.endswith(f"error: {files[wrong]} is not a {source} checkpoint (from={source} needs {needs}); "
                         f"it looks like a {found} checkpoint: use from={found} (or from=auto)")
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


def test_each_known_checkpoint_fits_exactly_one_format():
    """What from=auto relies on: taming's layout is shared by VAR's and IBQ's, and each detector excludes the others."""
    phis = {layout: var_state(var_tokenizer(num_refiners=1 if layout == "shared" else 4), layout)
            for layout in ("qresi_ls", "per_scale", "shared")}
    checkpoints = {"taming": {"state_dict": taming_state()}, "llamagen": {"model": llamagen_state()},
                   "magvit2": lfq_checkpoint(), "ibq": ibq_checkpoint(), "ibq_no_ema": ibq_checkpoint(ema=False),
                   "titok": titok_state(), "titok_pixels": titok_state("pixels"),
                   **{f"var_{layout}": state for layout, state in phis.items()},
                   "var_hits_only": {k: v for k, v in phis["shared"].items() if ".quant_resi." not in k},
                   "diffusers": diffusers_vq_state()}
    found = {kind: [s.name for s in FORMATS.values() if s.matches(ckpt)] for kind, ckpt in checkpoints.items()}
    assert found == {"taming": ["taming"], "llamagen": ["llamagen"], "magvit2": ["magvit2"], "ibq": ["magvit2"],
                     "ibq_no_ema": ["taming"],  # taming's layout exactly: only its yaml says IBQ (below)
                     "titok": ["titok"], "titok_pixels": ["titok"],
                     **{f"var_{layout}": ["var"] for layout in phis}, "var_hits_only": ["var"], "diffusers": ["diffusers"]}


def _convert_in_process(monkeypatch, capsys, args: list[str]) -> list[str]:
    """``export.py <args>`` in-process; the lines that mention from=auto."""
    monkeypatch.setattr(sys, "argv", ["export", *args])
    _entry_points()["export"]()
    output = capsys.readouterr()
    return [line for line in (output.out + output.err).splitlines() if "from=auto" in line]


@pytest.mark.parametrize("layout", ["taming", "llamagen", "var", "magvit2", "ibq", "diffusers", "titok"])
def test_auto_detects_each_layout_says_so_and_converts_as_the_explicit_source(tmp_path, monkeypatch, capsys, layout):
    files = _files(tmp_path)
    lines = _convert_in_process(monkeypatch, capsys, ["from=auto", f"checkpoint={files[layout]}", f"out={tmp_path / 'out'}"])
    assert lines == [f"from=auto: {files[layout]} is a checkpoint in the {FORMAT_OF[layout]} format"]
    expected = {"taming": lambda: convert_taming({"state_dict": taming_state()}),
                "llamagen": lambda: convert_llamagen({"model": llamagen_state()}),
                "var": lambda: convert_var(_var_checkpoint()),
                "magvit2": lambda: convert_magvit2(lfq_checkpoint()),
                "ibq": lambda: convert_magvit2(ibq_checkpoint()),
                "diffusers": lambda: convert_diffusers(diffusers_vq_state(), config=str(files["diffusers"] / "config.json")),
                "titok": lambda: convert_titok(titok_state())}[layout]()
    converted = Tokenizer.from_pretrained(tmp_path / "out")
    assert converted.config == expected.config
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in converted.state_dict().items())


def test_an_ibq_checkpoint_without_ema_converts_with_its_yaml_and_auto_asks_which(tmp_path, monkeypatch, capsys):
    """The export keys a format declares (magvit2: config, weights) reach its detector and converter."""
    files = _files(tmp_path)
    args = [f"checkpoint={files['ibq_no_ema']}", f"config={files['ibq_yaml']}"]
    line = _export_error(monkeypatch, capsys, tmp_path, "auto", files["ibq_no_ema"], f"config={files['ibq_yaml']}")
    assert line.endswith(f"error: {files['ibq_no_ema']} fits several checkpoint formats (magvit2, taming): "
                         "choose one with from=<name>")
    line = _export_error(monkeypatch, capsys, tmp_path, "magvit2", files["ibq"], "weights=shadow")
    assert line.endswith("error: weights='shadow' is invalid: allowed values are 'ema' or 'raw'")
    _convert_in_process(monkeypatch, capsys, ["from=magvit2", *args, f"out={tmp_path / 'out'}", "weights=raw"])
    converted = Tokenizer.from_pretrained(tmp_path / "out")
    assert converted.config["quantizer"]["_target_"].endswith("IndexBackpropQuantizer")
    assert torch.equal(converted.quantizer.codebook, taming_state()["quantize.embedding.weight"])


def test_console_prints_one_line_for_a_checkpoint_of_no_known_format(tmp_path):
    """End to end through a real process: what a user sees on the terminal."""
    unrelated = _files(tmp_path)["unrelated"]
    proc = subprocess.run([sys.executable, "export.py", "from=auto", f"checkpoint={unrelated}", f"out={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, IMAGETOK_OFFLINE="1"), timeout=120)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).strip().splitlines() == [
        f"error: {unrelated} is in none of the checkpoint formats from=auto knows ({'; '.join(LOOKED_FOR)}); "
        "its tensors are [foo]"]
