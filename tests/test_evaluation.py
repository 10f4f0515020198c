"""Evaluation: the Fréchet distance, PSNR, SSIM and LPIPS agree with the reference libraries on the same
inputs and weights; evaluate.py writes its files; token statistics are exact."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch import nn

from conftest import CONFIGS
from imagetok.errors import ConfigValueError, MissingWeightsError
from imagetok.evaluation.fid import FeatureStatistics, frechet_distance, load_reference
from imagetok.evaluation.inception import InceptionFeatures
from imagetok.evaluation.run import evaluate
from imagetok.evaluation.tokens import token_statistics, zipf_exponent
from imagetok.tokenizer import Tokenizer
from imagetok.training.run import train


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = FeatureStatistics(features.shape[1])
    s.update(torch.from_numpy(features))
    return s.mean_and_covariance()


def _sqrtm_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(300, 16)) * 3 + 1
    mu, sigma = _stats(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_distance_agrees_with_sqrtm_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(800, 64)), rng.normal(size=(800, 64)) * 1.2 + 0.3
    (mu1, s1), (mu2, s2) = _stats(a), _stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_sqrtm_fid(mu1, s1, mu2, s2), rel=1e-4)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-4)


def test_frechet_of_a_set_with_itself_is_zero_and_never_negative():
    x = np.random.default_rng(2).normal(size=(200, 32))
    mu, sigma = _stats(x)
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) <= 1e-6
    # rank-deficient covariances (fewer samples than dimensions): still real and >= 0
    small = _stats(x[:10])
    assert 0.0 <= frechet_distance(*small, *small) <= 1e-6
    assert frechet_distance(*small, mu, sigma) > 0


class _Features(nn.Module):
    """torchmetrics' custom-feature interface around our Inception wrapper."""

    def __init__(self, inception: InceptionFeatures) -> None:
        super().__init__()
        self.inception = inception

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception(x)


def test_fid_agrees_with_torchmetrics_on_the_same_images_and_network():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    inception = InceptionFeatures("64", random_weights=True)
    gen = torch.Generator().manual_seed(3)
    real = torch.randint(0, 256, (72, 3, 24, 24), dtype=torch.uint8, generator=gen)
    fake = (real.int() + torch.randint(-40, 41, real.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    reference = FrechetInceptionDistance(feature=_Features(inception))
    ours_real, ours_fake = FeatureStatistics(64), FeatureStatistics(64)
    for i in range(0, 72, 24):
        reference.update(real[i:i + 24], real=True)
        reference.update(fake[i:i + 24], real=False)
        ours_real.update(inception(real[i:i + 24]))
        ours_fake.update(inception(fake[i:i + 24]))
    ours = frechet_distance(*ours_real.mean_and_covariance(), *ours_fake.mean_and_covariance())
    assert ours > 0
    assert ours == pytest.approx(float(reference.compute()), rel=1e-4)


def test_lpips_agrees_with_the_lpips_package(tmp_path, monkeypatch):
    """Our LPIPS loads a VGG16 file through its own key mapping; the lpips package builds its slices from
    the same torchvision network itself. Same inputs must give the same distances."""
    import lpips
    import torchvision

    from imagetok.losses.perceptual import LPIPS

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", lambda *a, **k: vgg)
    reference = lpips.LPIPS(net="vgg", pretrained=True, verbose=False).eval()
    ours = LPIPS(str(path))
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference(x, y).flatten()
        for i in range(4):
            assert float(ours(x[i:i + 1], y[i:i + 1])) == pytest.approx(float(expected[i]), abs=1e-5)


def test_ssim_and_psnr_agree_with_scikit_image_and_numpy():
    """SSIM maps agree pixel for pixel with scikit-image away from the 5-pixel border (where the two
    libraries pad differently); our reported SSIM is torchmetrics' mean over the whole map."""
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.image import PeakSignalNoiseRatio

    gen = torch.Generator().manual_seed(4)
    real = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8, generator=gen)
    fake = (real.int() + torch.randint(-30, 31, real.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    r, f = real.float() / 255, fake.float() / 255
    _, ours = structural_similarity_index_measure(f, r, data_range=1.0, return_full_image=True)
    for i in range(3):
        _, expected = structural_similarity(r[i].double().numpy(), f[i].double().numpy(), data_range=1.0,
                                            channel_axis=0, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, full=True)
        np.testing.assert_allclose(ours[i, :, 5:-5, 5:-5].numpy(), expected[:, 5:-5, 5:-5], atol=1e-5)
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))(f, r)
    mse = ((real.double() - fake.double()) / 255).pow(2).mean(dim=(1, 2, 3))
    assert float(psnr) == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), abs=1e-4)


def test_token_statistics_are_exact():
    uniform = token_statistics(torch.full((16,), 5))
    assert uniform["usage"] == 1.0 and uniform["entropy_bits"] == pytest.approx(4.0)
    assert uniform["perplexity"] == pytest.approx(16.0)
    half = token_statistics(torch.tensor([3, 0, 1, 0]))
    assert half["usage"] == 0.5 and half["tokens"] == 4
    ranks = torch.arange(1, 201, dtype=torch.float64)
    assert zipf_exponent((1e6 * ranks ** -1.3).round()) == pytest.approx(1.3, abs=1e-3)
    assert math.isnan(zipf_exponent(torch.tensor([5, 0, 0])))


def test_token_statistics_of_the_used_codes_alone_need_the_codebook_size():
    full = token_statistics(torch.tensor([3, 0, 1, 0, 0, 4]))
    assert token_statistics(torch.tensor([3, 1, 4]), codebook_size=6) == full
    huge = token_statistics(torch.tensor([5, 5]), codebook_size=2**62)
    assert huge["usage"] == 2 / 2**62 and huge["entropy_bits"] == pytest.approx(1.0) and huge["codebook_size"] == 2**62


def test_eval_num_tokens_is_a_list_or_one_count_and_anything_else_names_the_key():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from imagetok.evaluation.run import prefix_lengths

    seq = SimpleNamespace(is_sequence=True, variable_length=True, encoder=SimpleNamespace(num_latent_tokens=32))
    grid = SimpleNamespace(is_sequence=False, variable_length=False, encoder=SimpleNamespace())
    assert prefix_lengths(seq, None) == [1, 2, 4, 8, 16, 32]
    assert prefix_lengths(seq, 4) == prefix_lengths(seq, [4]) == [4]  # eval.num_tokens=4 is [4], as the docs say
    assert prefix_lengths(seq, OmegaConf.create([8, 2, 8])) == [2, 8]
    assert prefix_lengths(grid, None) == prefix_lengths(grid, []) == []
    for bad in ("4", 4.0, True, [1.5], [True], OmegaConf.create({"k": 4}), [0], [33]):
        with pytest.raises(ConfigValueError, match=r"^eval\.num_tokens=") as err:
            prefix_lengths(seq, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigValueError, match=r"^eval\.num_tokens=\[4\] .*grid"):
        prefix_lengths(grid, 4)


def test_missing_inception_weights_is_one_clear_line(monkeypatch, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert "\n" not in message and "weights-inception-2015-12-05" in message and "eval.inception_weights" in message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import os

    os.environ["IMAGETOK_OFFLINE"] = "1"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=["trainer.max_steps=10", "trainer.val_check_interval=10",
                                          "data.val_samples=8", "loss.disc_start=100"])
    run_dir = tmp_path_factory.mktemp("run")
    train(cfg, run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _eval_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("evaluate", overrides=overrides)


FAST = ["eval.random_weights=true", "eval.feature_layer=64", "eval.num_images=24", "eval.batch_size=12",
        "eval.force=true"]


def test_evaluate_writes_metrics_with_protocol_and_pictures(checkpoint, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(_eval_config([f"checkpoint={checkpoint}", *FAST, f"eval.save_reference={tmp_path / 'ref.npz'}"]), out)
    for name in ("metrics.json", "summary.md", "reconstructions.png", "codebook_usage.png", "token_rank_frequency.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_images"] == 24 and saved["fid"] >= 0 and 0 < saved["ssim"] <= 1 and saved["lpips"] > 0
    assert saved["protocol"]["inception"]["layer"] == "64" and saved["protocol"]["versions"]["torch-fidelity"]
    assert saved["protocol"]["crop"] == "random_resized" and saved["protocol"]["image_size"] == 32
    assert saved["tokens_per_image"] == 64 and saved["bits_per_pixel"] == 0.625  # 8x8 tokens of 1024 codes, 32 px
    assert "| rFID |" in (out / "summary.md").read_text()
    assert "| crop | random_resized, 32 px |" in (out / "summary.md").read_text()
    assert Image.open(out / "codebook_usage.png").size[0] > 0

    # PSNR equals torchmetrics on the same uint8-rounded images; usage equals the distinct codes of encode()
    from torchmetrics.image import PeakSignalNoiseRatio

    from imagetok.data.sample import SampleDataModule

    cfg = _eval_config([f"checkpoint={checkpoint}"])
    data = {k: v for k, v in cfg.data.items() if k != "_target_"} | {"val_samples": 24}
    images = torch.stack([SampleDataModule(**data).val_dataset()[i] for i in range(24)])
    tok = Tokenizer.from_checkpoint(checkpoint)
    with torch.no_grad():
        recon, quant = tok(images)
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
    psnr.update(Tokenizer.to_uint8(recon[:12]).float() / 255, Tokenizer.to_uint8(images[:12]).float() / 255)
    psnr.update(Tokenizer.to_uint8(recon[12:]).float() / 255, Tokenizer.to_uint8(images[12:]).float() / 255)
    assert results["psnr"] == float(psnr.compute())
    assert results["tokens"][0]["usage"] == quant.indices.unique().numel() / tok.codebook_sizes[0]

    # token-language statistics of the split's indices, per sub-codebook, in metrics.json and summary.md
    (language,) = saved["token_language"]
    size = tok.codebook_sizes[0]
    assert language["images"] == 24 and language["tokens"] == quant.indices[..., 0].numel()
    assert language["layout"] == "grid" and language["codebook_size"] == size
    assert 0 <= language["conditional_entropy_left_up_bits"] <= language["conditional_entropy_left_bits"]
    assert language["conditional_entropy_left_bits"] <= language["unigram_entropy_bits"] + 1e-9 <= math.log2(size) + 1e-9
    assert 1 <= language["bigram_perplexity"] <= size and language["mutual_information_bits"][0] >= 0
    assert language["heaps_distinct"][-1] == quant.indices.unique().numel() and math.isfinite(language["heaps_beta"])
    assert language["zlib_bits_per_token"] > 0 and language["lzma_bits_per_token"] > 0
    assert saved["protocol"]["token_language"].startswith("plug-in")
    summary = (out / "summary.md").read_text()
    assert "| sub-codebook 0 predictability (24 images, " in summary and "| H(x given left, up) " in summary
    assert "lzma" in summary

    # a saved reference gives the same FID as the originals it was computed from
    mu, sigma = load_reference(tmp_path / "ref.npz")
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    again = evaluate(_eval_config([f"checkpoint={checkpoint}", *FAST, f"eval.fid_reference={tmp_path / 'ref.npz'}",
                                   "eval.metrics=[fid]"]), tmp_path / "eval2")
    assert again["fid"] == pytest.approx(results["fid"], rel=1e-9, abs=1e-12)
    assert "token_language" not in again and again["protocol"]["token_language"] is None  # no `tokens` asked


def test_evaluate_records_the_crop_that_made_its_numbers(checkpoint, tmp_path):
    """data.val_crop=adm: the images are guided-diffusion's crops, and metrics.json and summary.md say so."""
    from imagetok.data.imagefolder import read_image
    from imagetok.data.transforms import adm_center_crop, to_model_range

    for i, size in enumerate([(75, 41), (40, 90), (33, 33)]):
        (tmp_path / "tree" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / "val").mkdir(exist_ok=True)
        array = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(tmp_path / "tree" / "val" / f"{i}.png")
    Image.fromarray(array).save(tmp_path / "tree" / "train" / "0.png")
    data = ["data=imagefolder", f"data.root={tmp_path / 'tree'}", "data.image_size=32", "data.num_workers=0"]
    results = evaluate(_eval_config([f"checkpoint={checkpoint}", *data, "data.val_crop=adm", "eval.metrics=[psnr]"]),
                       tmp_path / "eval")
    protocol = json.loads((tmp_path / "eval" / "metrics.json").read_text())["protocol"]
    assert protocol["crop"] == "adm" and protocol["image_size"] == 32 and "center_crop_arr" in protocol["crop_description"]
    assert "| crop | adm, 32 px |" in (tmp_path / "eval" / "summary.md").read_text()
    tok = Tokenizer.from_checkpoint(checkpoint)
    images = torch.stack([to_model_range(adm_center_crop(read_image(tmp_path / "tree" / "val" / f"{i}.png"), 32))
                          for i in range(3)])
    from torchmetrics.image import PeakSignalNoiseRatio

    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
    with torch.no_grad():
        psnr.update(Tokenizer.to_uint8(tok(images)[0]).float() / 255, Tokenizer.to_uint8(images).float() / 255)
    assert results["psnr"] == pytest.approx(float(psnr.compute()), abs=1e-6)  # of the adm crops


def test_evaluate_refuses_bad_values(checkpoint, tmp_path):
    with pytest.raises(ConfigValueError, match="eval.num_images"):  # fewer images than feature dimensions
        evaluate(_eval_config([f"checkpoint={checkpoint}", "eval.random_weights=true", "eval.feature_layer=64",
                               "eval.num_images=8", "eval.metrics=[fid]"]), tmp_path / "a")
    with pytest.raises(ConfigValueError, match="eval.weights"):
        evaluate(_eval_config([f"checkpoint={checkpoint}", "eval.weights=best"]), tmp_path / "b")
    with pytest.raises(ConfigValueError, match="eval.metrics"):
        evaluate(_eval_config([f"checkpoint={checkpoint}", "eval.metrics=[fidd]"]), tmp_path / "c")
    with pytest.raises(ConfigValueError, match="checkpoint"):
        evaluate(_eval_config([f"checkpoint={tmp_path / 'nope.ckpt'}"]), tmp_path / "d")


def test_validation_fid_during_training_is_evaluate_py_number(tmp_path):
    """val/fid logged by training equals evaluate.py's rFID of the saved checkpoint on the same split."""
    import os

    os.environ["IMAGETOK_OFFLINE"] = "1"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=["trainer.max_steps=6", "trainer.val_check_interval=6", "data.val_samples=16",
                                          "data.val_batch_size=8", "loss.disc_start=100", "val_fid.enabled=true",
                                          "val_fid.random_weights=true", "val_fid.feature_layer=64"])
    result = train(cfg, tmp_path / "run")
    logged = result.summary["last_validation"]["val/fid"]
    evaluated = evaluate(_eval_config([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", *FAST,
                                       "eval.num_images=16", "eval.metrics=[fid]"]), tmp_path / "eval")
    assert logged > 0
    assert logged == pytest.approx(evaluated["fid"], rel=1e-5)  # logged as float32


def test_evaluation_on_two_processes_counts_each_image_once(checkpoint, tmp_path):
    """torchrun with 2 gloo processes: each rank reconstructs half the split and the merged numbers
    equal the single-process ones."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    args = [f"checkpoint={checkpoint}", *FAST, "eval.num_images=24", "eval.metrics=[psnr,ssim,fid,tokens]",
            "eval.token_language_max_images=11"]
    single = evaluate(_eval_config(args), tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1", IMAGETOK_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    str(ROOT / "evaluate.py"), *args, f"hydra.run.dir={tmp_path / 'double'}"],
                   check=True, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    double = json.loads((tmp_path / "double" / "metrics.json").read_text())
    assert double["num_images"] == 24 and double["protocol"]["world_size"] == 2
    assert double["tokens"] == single["tokens"]
    # the first 11 images' tokens, gathered in the split's order from both ranks (6 + 5)
    assert single["token_language"][0]["images"] == 11 and double["token_language"] == single["token_language"]
    for key in ("psnr", "ssim", "fid"):
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-9), key


def test_inception_weights_file_is_loaded_with_weights_only(tmp_path):
    """A local weights file gives exactly the network it holds; it is read with weights_only=True."""
    reference = InceptionFeatures("64", random_weights=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in reference.net.state_dict().items()}
    torch.save(state, tmp_path / "inception.pth")
    loaded = InceptionFeatures("64", weights_path=str(tmp_path / "inception.pth"))
    assert all(torch.equal(a, state[k]) for k, a in loaded.net.state_dict().items())
    torch.save({"x": os.system}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        InceptionFeatures("64", weights_path=str(tmp_path / "evil.pth"))
