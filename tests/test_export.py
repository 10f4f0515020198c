"""Export and downstream loading: save_pretrained / from_pretrained (safetensors, allowlisted classes,
readable key diffs, Hub ids), pre/post-processing, export.py with its model card, torch.export programs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import CONFIGS
from imagetok import Tokenizer
from imagetok.errors import ConfigValueError
from imagetok.export.run import export
from imagetok.training.run import tokenizer_config, train


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    os.environ["IMAGETOK_OFFLINE"] = "1"
    cfg = _compose("train", ["trainer.max_steps=8", "trainer.val_check_interval=8", "data.val_samples=8", "loss.disc_start=100"])
    path = tmp_path_factory.mktemp("run")
    train(cfg, path)
    return path


@pytest.fixture
def tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_config(tokenizer_config(_compose("train", []))).eval()


def test_round_trip_is_exact_and_downstream_api_works(tokenizer, tmp_path):
    gen = torch.Generator().manual_seed(0)
    pil_images = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy())
                  for _ in range(3)]
    tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    # the downstream snippet of the README, line for line, with nothing but the package
    tok = Tokenizer.from_pretrained(str(tmp_path / "tok"))
    images = tok.preprocess(pil_images)
    ids = tok.encode(images)
    recon = tok.decode(ids)
    pil_out, pixels = tok.to_pil(recon), tok.to_uint8(recon)
    sizes, shape, latents = tok.codebook_sizes, tok.token_shape(256), tok.indices_to_latents(ids)

    assert not tok.training and images.min() >= -1 and images.max() <= 1
    assert ids.dtype == torch.long and tuple(ids.shape) == (3, *tok.token_shape(32))
    with torch.no_grad():
        expected, _ = tokenizer(images)
    assert torch.equal(recon, expected) and torch.equal(tok(images)[0], expected)  # exact, not approximate
    assert len(pil_out) == 3 and pil_out[0].size == (32, 32) and pixels.dtype == torch.uint8
    assert sizes == [1024] and shape == (64, 64, 1)
    assert torch.equal(latents, tokenizer.indices_to_latents(ids)) and latents.shape == (3, tok.quantizer.out_dim, 8, 8)
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["codebook_sizes"] == [1024] and config["tokenizer"]["quantizer"]["_target_"].startswith("imagetok.")


def test_preprocess_and_postprocess(tokenizer):
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    as_float = Tokenizer.preprocess(pixels)
    assert as_float.min() >= -1 and as_float.max() <= 1
    assert torch.equal(Tokenizer.to_uint8(as_float), pixels)
    pil = Tokenizer.to_pil(as_float)
    assert isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    assert torch.equal(Tokenizer.preprocess(pil), as_float)
    assert torch.equal(Tokenizer.preprocess(pixels[0]), as_float[:1])
    assert torch.allclose(Tokenizer.preprocess(pixels.float() / 255), as_float, atol=1e-6)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        Tokenizer.preprocess(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_foreign_targets_are_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    config_path = tmp_path / "tok" / "config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer"]["encoder"]["_target_"] = "os.system"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigValueError, match="encoder._target_='os.system'.*foreign targets are refused"):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_a_weight_file_that_does_not_fit_gives_a_readable_diff(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    weights = tmp_path / "tok" / "model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.weight"]
    state["decoder.extra.weight"] = torch.zeros(2)
    state["quant_conv.bias"] = torch.zeros(99)
    save_file(state, str(weights))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_pretrained(tmp_path / "tok")
    message = str(err.value)
    assert "missing from the file (1):\n    decoder.conv_out.weight" in message
    assert "unexpected in the file (1):\n    decoder.extra.weight" in message
    assert "quant_conv.bias: file (99,) vs model (8,)" in message


def test_hub_ids_load_through_huggingface_hub(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    tokenizer.save_pretrained(tmp_path / "tok")
    asked = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        return str(tmp_path / "tok" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tok = Tokenizer.from_pretrained("someone/imagetok-vq", revision="v1")
    assert asked == [("someone/imagetok-vq", "config.json", "v1"), ("someone/imagetok-vq", "model.safetensors", "v1")]
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(tok.encode(x), tokenizer.encode(x))
    with pytest.raises(FileNotFoundError, match="neither a save_pretrained directory nor a Hub id"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_export_cli_writes_card_and_serving_programs(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    out = export(_compose("export", [f"checkpoint={checkpoint}", f"out={tmp_path / 'exported'}", "serving=true",
                                     "serving_batch_size=2"]))
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".log"))
    assert names == ["README.md", "config.json", "decode.pt2", "encode.pt2", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "8x8x1 tokens (64 per image)" in card and "generator steps: 8" in card and "codebook sizes [1024]" in card
    assert "val/psnr" in card  # the run's last validation
    # trained offline: the logs show no perceptual term, so no third-party weights were used
    assert card.split("## Licences of third-party weights used in training")[1].strip() == "- none"
    loaded, reference = Tokenizer.from_pretrained(out), Tokenizer.from_checkpoint(checkpoint)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    encode = torch.export.load(out / "encode.pt2").module()
    decode = torch.export.load(out / "decode.pt2").module()
    ids = encode(images)
    assert torch.equal(ids, reference.encode(images))
    with torch.no_grad():
        assert torch.equal(decode(ids), reference.decode(ids))
    # the raw weights on request differ from the EMA ones
    raw = export(_compose("export", [f"checkpoint={checkpoint}", f"out={tmp_path / 'raw'}", "weights=raw"]))
    assert not torch.equal(Tokenizer.from_pretrained(raw).decoder.conv_out.weight, loaded.decoder.conv_out.weight)
    with pytest.raises(ConfigValueError, match="checkpoint"):
        export(_compose("export", [f"checkpoint={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'x'}"]))


def test_from_auto_exports_a_training_checkpoint_as_from_null_does(run_dir, tmp_path, caplog):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    plain = export(_compose("export", [f"checkpoint={checkpoint}", f"out={tmp_path / 'plain'}"]))
    with caplog.at_level("INFO", logger="imagetok"):
        auto = export(_compose("export", ["from=auto", f"checkpoint={checkpoint}", f"out={tmp_path / 'auto'}"]))
    assert f"from=auto: {checkpoint} is a checkpoint in the imagetok format" in caplog.text
    for name in ("config.json", "README.md"):
        assert (auto / name).read_bytes() == (plain / name).read_bytes(), name
    # safetensors writes its metadata map in no fixed order, so the weights are compared, not the bytes
    from safetensors import safe_open

    with safe_open(auto / "model.safetensors", "pt") as a, safe_open(plain / "model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_evaluate_reads_a_save_pretrained_directory(run_dir, tmp_path):
    from imagetok.evaluation.run import evaluate

    out = export(_compose("export", [f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'e'}"]))
    from_dir = evaluate(_compose("evaluate", [f"checkpoint={out}", "eval.metrics=[psnr,tokens]", "eval.num_images=8"]), tmp_path / "a")
    from_ckpt = evaluate(_compose("evaluate", [f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", "eval.metrics=[psnr,tokens]",
                                               "eval.num_images=8"]), tmp_path / "b")
    assert from_dir["psnr"] == from_ckpt["psnr"] and from_dir["tokens"] == from_ckpt["tokens"]


def test_push_to_hub_uploads_a_save_pretrained_folder(tokenizer, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tokenizer.push_to_hub("me/tok", token="hf_x")
    assert url.endswith("/commit/abc")
    assert calls == [("token", "hf_x"), ("create", "me/tok", True, True), ("upload", "me/tok", ["config.json", "model.safetensors"])]


def test_model_card_quotes_an_evaluation_and_names_third_party_weights(tokenizer, tmp_path):
    from imagetok.export.model_card import model_card, run_metrics

    evaluation = tmp_path / "metrics.json"
    evaluation.write_text(json.dumps({"num_images": 50000, "fid": 2.19, "psnr": 20.8, "tokens": [{"usage": 1.0}],
                                      "protocol": {"evaluation_split": "imagefolder validation split, 50000 images"}}))
    numbers = run_metrics(tmp_path / "run" / "checkpoints" / "last.ckpt", str(evaluation))
    run_config = {"data": {"_target_": "imagetok.data.imagefolder.ImageFolderDataModule", "root": "/data/in1k",
                           "image_size": 256, "batch_size": 32},
                  "loss": {"perceptual_weight": 1.0, "semantic": {"teacher": {"arch": "vit_b_16"}}}}
    card = model_card(tokenizer, run_config, 400_000, numbers, "ema", "last.ckpt", lpips_used=True)
    assert "| fid | 2.19 |" in card and "| num_images | 50000 |" in card and "imagefolder validation split" in card
    assert "64x64x1 tokens (4096 per image)" in card and "generator steps: 400000" in card and "/data/in1k" in card
    assert "LPIPS" in card and "VGG16" in card and "ViT-B/16 ImageNet weights" in card
    with pytest.raises(ConfigValueError, match="evaluation="):
        run_metrics(tmp_path / "last.ckpt", str(tmp_path / "missing.json"))


@pytest.mark.parametrize("experiment", ["cpu_rq", "cpu_fsq", "cpu_fqgan", "cpu_dualtoken", "cpu_simvq", "cpu_ibq"])
def test_every_quantizer_family_round_trips_through_save_pretrained(experiment, tmp_path):
    """K sub-tokens per position (residual, factorized, dual) and out_dim != dim (factorized) included."""
    torch.manual_seed(0)
    original = Tokenizer.from_config(tokenizer_config(_compose("train", [f"experiment={experiment}"]))).eval()
    tok = Tokenizer.from_pretrained(original.save_pretrained(tmp_path / "tok"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok.encode(images)
    assert tuple(ids.shape) == (2, *tok.token_shape(32)) and tok.token_shape(32)[2] == len(tok.codebook_sizes)
    with torch.no_grad():
        assert torch.equal(tok.decode(ids), original(images)[0])
    if experiment == "cpu_fqgan":  # serving programs take the multi-codebook indices as well
        from imagetok.export.serving import export_programs

        programs = export_programs(tok, images)
        assert torch.equal(programs["encode"].module()(images), ids)
        with torch.no_grad():
            assert torch.equal(programs["decode"].module()(ids), tok.decode(ids))


def test_training_checkpoints_load_weights_only_and_report_key_mismatches(tokenizer, tmp_path):
    state = {f"ema.module.{k}": v for k, v in tokenizer.state_dict().items()}
    state.update({f"tokenizer.{k}": v + 1 if v.is_floating_point() else v for k, v in tokenizer.state_dict().items()})
    checkpoint = {"hyper_parameters": {"tokenizer_config": tokenizer.config}, "state_dict": state}
    torch.save(checkpoint, tmp_path / "ok.ckpt")
    assert torch.equal(Tokenizer.from_checkpoint(tmp_path / "ok.ckpt").encoder.conv_in.weight, tokenizer.encoder.conv_in.weight)
    assert torch.equal(Tokenizer.from_checkpoint(tmp_path / "ok.ckpt", weights="raw").encoder.conv_in.weight,
                       tokenizer.encoder.conv_in.weight + 1)
    del state["ema.module.encoder.conv_in.bias"]
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing from the file \(1\):\n    encoder.conv_in.bias"):
        Tokenizer.from_checkpoint(tmp_path / "bad.ckpt")
    checkpoint["callback"] = os.system  # anything beyond tensors and containers is refused by weights_only
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        Tokenizer.from_checkpoint(tmp_path / "evil.ckpt")
