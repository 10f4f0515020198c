"""Data-parallel training with 2 CPU processes (gloo), launched from the CLI as a user would.

Before and after the discriminator starts, each backward touches only one network: with one DDP
wrapper for the whole module this fails unless find_unused_parameters is on. The run also goes
through k-means initialisation, EMA codebook updates and dead-code restarts, and at the end every
parameter and buffer must be bitwise identical on both ranks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT
from imagetok.tokenizer import Tokenizer
from imagetok.training.rank_sync import state_checksums, unsynced_state
from imagetok.training.strategy import wants_ddp


def test_two_process_training_keeps_ranks_identical_without_unused_parameters(ddp_run):
    summary = json.loads((ddp_run / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["generator_steps"] == 4
    assert summary["ranks_in_sync"] is True
    with open(ddp_run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/quantizer/restarted_codes")]
    assert sum(float(r["train/quantizer/restarted_codes"]) for r in rows) > 0  # restarts were exercised
    assert any(r.get("train/disc") for r in rows)  # and the discriminator trained
    tok = Tokenizer.from_checkpoint(ddp_run / "checkpoints" / "last.ckpt")
    assert bool(tok.quantizer.initialized)  # k-means ran


def test_two_process_training_keeps_lecam_anchors_dino_heads_and_repa_projector_in_sync(tmp_path):
    """LeCAM's anchors (rank-averaged EMA), the DINO heads' spectral-norm vectors, the REPA projector
    (outside the DDP wrappers, gradients averaged by hand) and lazy R1 through the DDP wrapper."""
    run_dir = tmp_path / "run"
    overrides = ["experiment=cpu_dino_disc", "loss/repa=dinov2", "loss.repa.teacher.random_backbone=true",
                 "loss.repa.teacher.input_size=28", "loss.repa.hidden_dim=32", "loss.r1_weight=1.0", "loss.r1_every=2",
                 "+loss.discriminator.backbone.model_kwargs={depth:4,embed_dim:32,num_heads:2}",
                 "loss.discriminator.backbone.blocks=[1,3]", "+loss.repa.teacher.model_kwargs={depth:2,embed_dim:32,num_heads:2}",
                 "trainer.max_steps=8", "loss.disc_start=2", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
                 "data.val_samples=16", "data.val_batch_size=8", "data.batch_size=4", "checkpoint.every_n_steps=8",
                 "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, IMAGETOK_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert float(state["loss.lecam.anchor_real"]) != 0.0 and any(k.startswith("loss.repa.projector.") for k in state)
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/r1") for r in rows) and any(r.get("train/repa") for r in rows)


def test_rank_check_names_the_tensors_that_differ():
    module = torch.nn.Linear(3, 2)
    names, sums = state_checksums(module)

    def fake_all_gather(tensor):  # rank 1 holds a bias one bit away from rank 0's
        other = module.state_dict()
        other["bias"] = torch.nextafter(other["bias"], torch.tensor(1e9))
        return torch.stack([tensor, state_checksums_of(other)])

    def state_checksums_of(state):
        clone = torch.nn.Linear(3, 2)
        clone.load_state_dict(state)
        return state_checksums(clone)[1]

    assert names == ["weight", "bias"]
    assert unsynced_state(module, fake_all_gather) == ["bias"]
    assert unsynced_state(module, lambda t: torch.stack([t, t.clone()])) == []


def test_ddp_is_chosen_only_for_more_than_one_process():
    assert wants_ddp("auto", 2, 1) and wants_ddp("ddp", 1, 1) and wants_ddp("auto", 1, 2)
    assert not wants_ddp("auto", 1, 1) and not wants_ddp("fsdp", 8, 1) and not wants_ddp("auto", [0], 1)
