"""TiTok's two-stage training through the CLI (issue 15, part 3): stage 1 learns a grid tokenizer's codes with
cross-entropy (and lowers it), through a decoder that starts from and keeps that tokenizer's pixel
decoder; stage 2 starts from stage 1 (``init_from``) and trains the decoder only (``freeze``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from imagetok import Tokenizer
from imagetok.training.run import tokenizer_config, train
from test_cli_errors import _error_lines, _run_in_process

SMALL_TEACHER = ["data.image_size=16", "encoder.ch=16", "encoder.ch_mult=[1,2]", "encoder.z_channels=8",
                 "quantizer.codebook_size=64"]
SMALL_1D = ["data.image_size=16", "encoder.width=32", "encoder.depth=1", "encoder.num_heads=2",
            "encoder.num_latent_tokens=8", "encoder.z_channels=8", "quantizer.kmeans_init_batches=1",
            "data.batch_size=8", "data.val_batch_size=8", "data.val_samples=8", "trainer.log_every_n_steps=1",
            "loss.discriminator.ch=8", "loss.perceptual_weight=0"]


@pytest.fixture
def teacher(compose_config, tmp_path) -> Path:
    """A small grid tokenizer (random weights: its codes are still a fixed function of the image)."""
    torch.manual_seed(0)
    tok = Tokenizer.from_config(tokenizer_config(compose_config(SMALL_TEACHER)))
    return tok.save_pretrained(tmp_path / "teacher")


def _logged(run_dir: Path, key: str) -> list[float]:
    (path,) = run_dir.rglob("metrics.csv")
    with open(path) as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_stage_one_lowers_the_cross_entropy_and_keeps_the_teacher_decoder(compose_config, tmp_path, teacher, one_thread):
    cfg = compose_config(["experiment=cpu_titok_proxy", f"loss.proxy_codes.teacher={teacher}", *SMALL_1D,
                          "trainer.max_steps=40", "trainer.val_check_interval=40", "optim.warmup_steps=5"])
    run = train(cfg, tmp_path / "stage1")
    ce = _logged(tmp_path / "stage1", "train/proxy_ce")
    late = sum(ce[-5:]) / 5
    assert len(ce) == 40 and late < ce[0] - 1.0, ce  # it learns the teacher's codes ...
    assert late < torch.log(torch.tensor(64.0)).item() - 1.0, ce  # ... well below the uniform guess, ln V
    ref = Tokenizer.from_pretrained(teacher)
    tok = run.module.tokenizer
    for name, tensor in ref.decoder.state_dict().items():  # frozen in stage 1: still the teacher's
        assert torch.equal(tok.decoder.pixel_decoder.state_dict()[name], tensor), name
    codes = ref.quantizer.indices_to_latents(torch.arange(64).view(1, 64, 1, 1))[0, :, :, 0].t()
    assert torch.equal(tok.decoder.codebook, codes)
    # The saved tokenizer rebuilds from its JSON config alone and decodes alike.
    out = run.module.eval_tokenizer.save_pretrained(tmp_path / "export")
    back = Tokenizer.from_pretrained(out)
    images = next(iter(run.datamodule.val_dataloader()))
    ids = back.encode(images)
    assert ids.shape == (8, 8, 1)
    assert torch.allclose(back.decode(ids), run.module.eval_tokenizer.eval().decode(ids), atol=1e-6)


def test_stage_two_starts_from_stage_one_and_trains_only_the_decoder(compose_config, tmp_path, teacher, one_thread):
    common = [f"loss.proxy_codes.teacher={teacher}", *SMALL_1D, "trainer.val_check_interval=10"]
    stage1 = train(compose_config(["experiment=cpu_titok_proxy", *common, "trainer.max_steps=10"]), tmp_path / "s1")
    start = {k: v.clone() for k, v in stage1.module.eval_tokenizer.state_dict().items()}
    cfg = compose_config(["experiment=cpu_titok_proxy_stage2", *common, "trainer.max_steps=10",
                          f"init_from={tmp_path / 's1' / 'checkpoints' / 'last.ckpt'}"])
    stage2 = train(cfg, tmp_path / "s2")
    after = stage2.module.tokenizer.state_dict()
    for name, tensor in start.items():
        if name.startswith(("encoder.", "quant_conv.", "quantizer.")):
            assert torch.equal(after[name], tensor), name  # frozen, EMA codebook included
    changed = [n for n in start if n.startswith("decoder.") and not torch.equal(after[n], start[n])]
    assert any(n.startswith("decoder.code_decoder.") for n in changed) and any(n.startswith("decoder.pixel_decoder.") for n in changed)
    assert _logged(tmp_path / "s2", "train/pixel")  # trained on pixels


@pytest.mark.parametrize("case", ["no teacher", "missing teacher", "1D teacher", "wrong init_from", "bad freeze"])
def test_bad_two_stage_values_are_one_line(compose_config, tmp_path, teacher, monkeypatch, capsys, case):
    run = [f"hydra.run.dir={tmp_path / 'run'}", *SMALL_1D, "trainer.max_steps=1"]
    oned = Tokenizer.from_config(tokenizer_config(compose_config(["experiment=cpu_titok", *SMALL_1D])))
    args, expected = {
        "no teacher": (["experiment=cpu_titok_proxy", "~loss/proxy_codes"], "loss.proxy_codes"),
        "missing teacher": (["experiment=cpu_titok_proxy", f"loss.proxy_codes.teacher={tmp_path / 'nope'}"],
                            "loss.proxy_codes.teacher"),
        "1D teacher": (["experiment=cpu_titok_proxy",
                        f"loss.proxy_codes.teacher={oned.save_pretrained(tmp_path / 'oned')}"], "a grid tokenizer"),
        "wrong init_from": (["experiment=cpu_titok_proxy", f"loss.proxy_codes.teacher={teacher}",
                             f"init_from={teacher}"], "init_from="),
        "bad freeze": (["experiment=cpu_titok_proxy", f"loss.proxy_codes.teacher={teacher}", "freeze=[decoder.nope]"],
                       "freeze"),
    }[case]
    output = _run_in_process(monkeypatch, capsys, "train", [*args, *run])  # asserts exit code 2
    (line,) = _error_lines(output)
    assert expected in line and "Traceback" not in output


def test_causal_tokens_and_nested_dropout_work_through_proxy_codes(compose_config, teacher):
    """Issue 15, part 5: SEED-style causal tokens and FlexTok's nested dropout with the proxy-code decoder."""
    from imagetok.losses.proxy_codes import ProxyCodeLoss

    cfg = compose_config(["experiment=cpu_titok_proxy", f"loss.proxy_codes.teacher={teacher}", *SMALL_1D,
                          "encoder.causal=true", "decoder.code_decoder.token_drop=pow2"])
    ProxyCodeLoss(teacher=str(teacher)).complete_decoder_config(cfg)
    torch.manual_seed(0)
    tok = Tokenizer.from_config(tokenizer_config(cfg)).eval()
    assert tok.variable_length and tok.encoder.causal
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = tok.encode(images)
    assert ids.shape == (2, 8, 1) and tok.encode(images, num_tokens=2).shape == (2, 2, 1)
    full = tok.decode(ids)
    for k in (1, 2, 4):  # every prefix decodes, and to something else than all the tokens
        prefix = tok.decode(ids[:, :k])
        assert prefix.shape == (2, 3, 16, 16) and not torch.allclose(prefix, full)
    tok.train()
    recon, _ = tok(images)  # a training forward draws a prefix per sample
    assert recon.shape == (2, 3, 16, 16)
