"""One pass over a split for inference (imagetok/data/inference.py): indexed datasets are divided by
index, streams are cut to ``num_images`` and re-batched; evaluate.py (one and two processes) and
fit_quantizer read webdataset shards, counting every image once; tokenize_dataset refuses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.utils.data import Dataset, IterableDataset

from conftest import CONFIGS, ROOT
from imagetok.data.inference import InferenceImages
from imagetok.errors import ConfigValueError
from imagetok.tokenizer import Tokenizer
from imagetok.training.run import tokenizer_config
from test_train_variants import TINY
from test_webdataset import N, _ids, shards  # noqa: F401  (shards: the module's fixture of 6 two-image shards)


def _image(number: int) -> torch.Tensor:
    return torch.full((3, 2, 2), float(number))


def _numbers(batches) -> list[list[int]]:
    return [b[:, 0, 0, 0].long().tolist() for b in batches]


class _Indexed(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        return _image(i)


class _Stream(IterableDataset):
    """Images 0..9, in batches of ``per_item`` (None: single images ``[3, 2, 2]``)."""

    def __init__(self, per_item: int | None) -> None:
        self.per_item = per_item

    def __iter__(self):
        if self.per_item is None:
            yield from (_image(i) for i in range(10))
        else:
            for start in range(0, 10, self.per_item):
                yield torch.stack([_image(i) for i in range(start, min(10, start + self.per_item))])


def test_an_indexed_split_is_divided_by_index_and_each_image_falls_to_one_rank():
    ranks = [InferenceImages(_Indexed(), batch_size=2, num_images=7, rank=r, world=3) for r in range(3)]
    assert [r.expected for r in ranks] == [3, 2, 2] and all(r.total == 7 and not r.stream for r in ranks)
    assert _numbers(ranks[0]) == [[0, 3], [6]] and _numbers(ranks[1]) == [[1, 4]] and _numbers(ranks[2]) == [[2, 5]]
    whole = InferenceImages(_Indexed(), batch_size=4)
    assert whole.expected == whole.total == 10 and _numbers(whole) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("per_item", [None, 1, 3, 4])
def test_a_stream_is_cut_to_its_share_and_rebatched(per_item):
    whole = InferenceImages(_Stream(per_item), batch_size=4)
    assert whole.stream and whole.expected is None and whole.total is None
    assert _numbers(whole) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _numbers(InferenceImages(_Stream(per_item), batch_size=4, num_images=5)) == [[0, 1, 2, 3], [4]]
    # a stream splits itself across ranks; here rank 1 of 2 takes its share of 5, two images
    share = InferenceImages(_Stream(per_item), batch_size=4, num_images=5, rank=1, world=2)
    assert share.expected == 2 and share.total == 5 and _numbers(share) == [[0, 1]]
    assert _numbers(InferenceImages(_Stream(per_item), batch_size=4, num_images=1, rank=1, world=2)) == []


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


def _pretrained(tmp_path, *overrides: str):
    torch.manual_seed(0)
    tok = Tokenizer.from_config(tokenizer_config(_compose("train", [*TINY, *overrides]))).eval()
    return tok, tok.save_pretrained(tmp_path / "tok")


def _shard_data(urls: str) -> list[str]:
    return ["data=webdataset", f"data.urls='{urls}'", f"data.val_urls='{urls}'", "data.image_size=16",
            "data.num_workers=0", "data.batch_size=4", "data.epoch_length=8", "data.shuffle_buffer=0"]


def test_evaluate_reads_shards_once_on_one_and_on_two_processes(shards, tmp_path):  # noqa: F811
    from imagetok.data.webdataset import WebDataModule
    from imagetok.evaluation.run import evaluate

    tok, directory = _pretrained(tmp_path)
    args = [f"checkpoint={directory}", *_shard_data(shards), "eval.metrics=[psnr,tokens]", "eval.batch_size=5"]
    every = evaluate(_compose("evaluate", args), tmp_path / "all")
    assert every["num_images"] == N == every["tokens"][0]["tokens"] // 64  # 8x8 tokens per image
    data = WebDataModule(**{k: v for k, v in _compose("evaluate", args).data.items() if k != "_target_"})
    images = torch.stack(list(data.val_dataset()))  # [12, 3, 16, 16], shard order
    assert sorted(_ids(images)) == list(range(N))
    with torch.no_grad():
        assert every["tokens"][0]["usage"] == tok.encode(images).unique().numel() / tok.codebook_sizes[0]
    first = evaluate(_compose("evaluate", [*args, "eval.num_images=7"]), tmp_path / "seven")
    assert first["num_images"] == 7 and first["tokens"][0]["tokens"] == 7 * 64

    # torchrun, 2 gloo processes: rank 0 reads shards 0, 2, 4 (images 0, 1, 4, 5, 8, 9) and rank 1 the
    # others; of eval.num_images=7 rank 0 takes 4 (0, 1, 4, 5) and rank 1 3 (2, 3, 6): images 0..6,
    # the same ones as one process, each once
    env = dict(os.environ, OMP_NUM_THREADS="1", IMAGETOK_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           str(ROOT / "evaluate.py"), *args, "eval.num_images=7", f"hydra.run.dir={tmp_path / 'double'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    double = json.loads((tmp_path / "double" / "metrics.json").read_text())
    assert double["num_images"] == 7 and double["protocol"]["world_size"] == 2
    assert double["tokens"] == first["tokens"]
    assert double["psnr"] == pytest.approx(first["psnr"], rel=1e-6)


def test_fit_quantizer_takes_its_images_from_the_training_stream(shards, tmp_path):  # noqa: F811
    from imagetok.fit_quantizer import fit

    _, directory = _pretrained(tmp_path, "experiment=cpu_tokenbridge")
    common = [f"checkpoint={directory}", *_shard_data(shards), "batch_size=5", "num_bins=4"]
    out = fit(_compose("fit_quantizer", [*common, f"out={tmp_path / 'fitted'}", "num_images=14"]))
    report = json.loads((out / "quantizer_fit.json").read_text())
    # the first 14 images of the endless training stream (shards drawn with replacement): more than the
    # 12 the shards hold, in batches of 5 re-cut from the stream's batches of 4
    assert report["num_images"] == 14 and report["num_latents"] == 14 * 64
    assert Tokenizer.from_pretrained(out).quantizer.is_fitted
    with pytest.raises(ConfigValueError, match=r"^num_images=None .*data=webdataset"):
        fit(_compose("fit_quantizer", [*common, f"out={tmp_path / 'none'}", "num_images=null"]))


def test_tokenize_dataset_refuses_a_stream_in_one_line(shards, tmp_path):  # noqa: F811
    from imagetok.tokenize_dataset import tokenize

    _, directory = _pretrained(tmp_path)
    cfg = _compose("tokenize_dataset", [f"pretrained={directory}", f"out={tmp_path / 'tokens'}", *_shard_data(shards)])
    with pytest.raises(ConfigValueError, match=r"^data='imagetok\.data\.webdataset\.WebDataModule' .*data=imagefolder") as err:
        tokenize(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "tokens" / "index.json").exists()
