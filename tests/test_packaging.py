"""The package as users install it: a built wheel in a fresh virtual environment trains and exports from
outside the repository (configs ship inside the package), and a user's own config directory joins the
search path through ``--config-dir``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import ROOT
from test_train_variants import SAMPLE, TINY


def _run(command, cwd, **kwargs):
    env = dict(os.environ, IMAGETOK_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # nothing from the checkout: only what the wheel installed
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow  # about 40 s: builds a wheel and a virtual environment
def test_wheel_in_a_fresh_venv_trains_and_exports_outside_the_repository(tmp_path):
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)], tmp_path)
    wheel = next(dist.glob("imagetok-*.whl"))
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch, Lightning, ...) from this environment, without its editable imagetok.
    (tmp_path / site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)

    where = _run([python, "-c", "import imagetok; print(imagetok.__file__)"], work)
    assert where.strip().startswith(site), where
    run_dir = work / "run"
    _run([bin_dir / "imagetok-train", *TINY, *SAMPLE, "trainer.max_steps=3", "checkpoint.every_n_steps=3",
          "trainer.val_check_interval=3", f"hydra.run.dir={run_dir}"], work)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    _run([bin_dir / "imagetok-export", f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={work / 'exported'}"], work)
    assert (work / "exported" / "model.safetensors").is_file()
    for module in ("imagetok.tokenize_dataset", "imagetok.fit_quantizer"):  # failed without configs in the package
        assert "seed: 0" in _run([python, "-m", module, "--help"], work)


def test_a_users_config_directory_adds_recipes_to_the_console_script(tmp_path):
    recipes = tmp_path / "my_configs" / "experiment"
    recipes.mkdir(parents=True)
    (recipes / "my_recipe.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /quantizer: fsq
        trainer:
          max_steps: 1234
        """))
    script = os.path.join(os.path.dirname(sys.executable), "imagetok-train")
    printed = _run([script, "--config-dir", str(tmp_path / "my_configs"), "experiment=my_recipe", "--cfg", "job"], tmp_path)
    assert "max_steps: 1234" in printed and "imagetok.quantizers.fsq" in printed.lower(), printed[-2000:]
