"""How the networks run (training/performance.py, training/nonfinite.py): no host syncs in a training
step, torch.compile, channels-last and activation checkpointing give the same results as the plain
eager run, and their checkpoints load into an eager tokenizer."""

from __future__ import annotations

import pytest
import torch

from imagetok.tokenizer import Tokenizer
from imagetok.training.module import TokenizerTrainingModule
from imagetok.training.run import build, train
from imagetok.utils.host_sync import HostSyncRecorder
from test_cli_errors import _error_lines, _run_in_process
from test_train_variants import SAMPLE, TINY

# The default objective in full: L1, LPIPS (random VGG), PatchGAN from step 0 with the adaptive weight,
# the quantizer loss and the weight EMA.
FULL_OBJECTIVE = [*TINY, *SAMPLE, "loss.perceptual_weight=1.0", "loss.perceptual_random_backbone=true",
                  "loss.disc_start=0", "trainer.val_check_interval=100", "checkpoint.every_n_steps=100",
                  "trainer.log_every_n_steps=50"]


def _record_syncs(monkeypatch: pytest.MonkeyPatch, from_batch: int) -> list:
    """Record the host syncs inside every training step from batch ``from_batch`` on."""
    syncs: list = []
    original = TokenizerTrainingModule.training_step

    def training_step(self, batch, batch_idx):
        if batch_idx < from_batch:
            return original(self, batch, batch_idx)
        with HostSyncRecorder() as recorder:
            out = original(self, batch, batch_idx)
        syncs.extend(recorder.syncs)
        return out

    monkeypatch.setattr(TokenizerTrainingModule, "training_step", training_step)
    return syncs


def test_the_recorder_sees_what_would_make_a_gpu_wait():
    x = torch.randn(8)
    with HostSyncRecorder() as recorder:
        float(x.sum())
        x[x > 0] = 0.0
        torch.bincount(torch.tensor([1, 2]))
        (x + 1).mul_(2)  # device-side work only
    assert [s.op for s in recorder.syncs] == ["_local_scalar_dense", "index_put_", "bincount"]


NO_LPIPS = ["loss.perceptual_weight=0"]  # a random VGG16 takes seconds to build: in one test of each kind only


@pytest.mark.parametrize("recipe", [["optim.grad_clip=null"],
                                    ["experiment=cpu_vq_ema", "quantizer.codebook_size=64", *NO_LPIPS,
                                     "quantizer.kmeans_init_batches=2", "quantizer.dead_code_threshold=0"]],
                         ids=["default_with_lpips_without_clipping", "ema_codebook_with_clipping"])
def test_a_training_step_has_no_host_sync(compose_config, tmp_path, monkeypatch, recipe):
    """Generator and discriminator steps of the full objective: no op in them would wait for a GPU
    (the non-finite checks are read one step late from pinned memory, see training/nonfinite.py).
    The first batches (k-means initialisation, the first read of the codebook state) may sync."""
    syncs = _record_syncs(monkeypatch, from_batch=2)
    cfg = compose_config([*FULL_OBJECTIVE, *recipe, "trainer.max_steps=4"])
    run = train(cfg, tmp_path)
    assert run.trainer.global_step == 4
    assert not syncs, sorted({(s.op, s.where, s.innermost) for s in syncs})


def test_skip_mode_reads_one_flag_per_network(compose_config, tmp_path, monkeypatch):
    """optim.nonfinite=skip must decide before each update: it reads one flag per network (the
    ``tolist`` of a two-element flag tensor, which the recorder does not see), nothing else."""
    syncs = _record_syncs(monkeypatch, from_batch=1)
    train(compose_config([*FULL_OBJECTIVE, *NO_LPIPS, "trainer.max_steps=2", "optim.nonfinite=skip"]), tmp_path)
    assert syncs == []


def _losses(cfg, tmp_path) -> tuple[list[dict[str, float]], TokenizerTrainingModule]:
    rows: list[dict[str, float]] = []
    original = TokenizerTrainingModule.log_dict

    def log_dict(self, metrics, *args, **kwargs):
        rows.append({k: float(v) for k, v in metrics.items() if k in ("train/pixel", "train/perceptual",
                                                                      "train/adversarial", "train/disc")})
        return original(self, metrics, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TokenizerTrainingModule, "log_dict", log_dict)
        run = train(cfg, tmp_path)
    return rows, run.module


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("true", marks=[pytest.mark.inductor, pytest.mark.slow])])
def test_compiled_steps_match_eager_and_checkpoints_load_eagerly(compose_config, tmp_path, backend):
    """trainer.compile: the same losses as eager to float tolerance, and a checkpoint whose
    keys are the eager tokenizer's (no ``_orig_mod.``), over 2 steps. ``aot_eager`` runs TorchDynamo's capture (graph
    breaks at the quantizer included) and AOTAutograd's joint forward/backward graphs, in seconds;
    ``true`` (inductor, C++ code generation) takes minutes on 2 cores: ``pytest -m inductor``."""
    overrides = [*FULL_OBJECTIVE, "trainer.max_steps=2"]
    eager, _ = _losses(compose_config(overrides), tmp_path / "eager")
    compiled, module = _losses(compose_config([*overrides, f"trainer.compile={backend}"]), tmp_path / "compiled")
    assert getattr(module.tokenizer.encoder, "_compiled_call_impl", None) is not None  # it did compile
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert a.keys() == b.keys() and len(a) == 4  # pixel, perceptual, adversarial, disc
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    Tokenizer.from_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.ckpt")  # strict load, eager


def test_channels_last_gives_the_same_losses_and_plain_checkpoints(compose_config, tmp_path):
    overrides = [*FULL_OBJECTIVE, *NO_LPIPS, "trainer.max_steps=2"]
    plain, _ = _losses(compose_config([*overrides, "model.channels_last=false"]), tmp_path / "plain")
    nhwc, module = _losses(compose_config([*overrides, "model.channels_last=true"]), tmp_path / "nhwc")
    assert module.tokenizer.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, nhwc):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    state = torch.load(tmp_path / "nhwc" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.is_contiguous() for v in state.values())  # safetensors export needs the default layout


VIT = ["experiment=cpu_vit_vqgan", "encoder.width=32", "encoder.depth=2", "encoder.num_heads=2", "data.image_size=16",
       "data.batch_size=2", *SAMPLE, "loss.discriminator.ch=8", "trainer.max_steps=1"]


def test_activation_checkpointing_keeps_the_gradients(compose_config, one_thread):
    """model.activation_checkpointing=true recomputes each transformer block in backward: the same
    loss and the same gradients, and fewer tensors saved for backward."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        module, _ = build(compose_config([*VIT, f"model.activation_checkpointing={str(recompute).lower()}"]))
        module.setup("fit")  # without a trainer: the execution settings alone
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            recon, quant = module.tokenizer(images)
            loss = (recon - images).abs().mean() + quant.loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in module.tokenizer.named_parameters()
                                      if p.grad is not None}, sum(saved)))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_b < 0.8 * saved_a


@pytest.mark.parametrize("override,allowed", [
    ("trainer.compile=", "true (inductor), false, or the name of a torch.compile backend"),
    ("model.channels_last=sometimes", "auto (on CUDA), true or false"),
    ("model.activation_checkpointing=2", "true or false"),
    ("optim.fused=maybe", "auto (fused AdamW on CUDA), true or false"),
])
def test_bad_execution_values_are_one_line_from_the_cli(tmp_path, monkeypatch, capsys, override, allowed):
    output = _run_in_process(monkeypatch, capsys, "train", [override, f"hydra.run.dir={tmp_path}"])
    (line,) = _error_lines(output)
    assert override.split("=")[0] in line and allowed in line and "Traceback" not in output
