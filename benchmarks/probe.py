"""AR probe speed on the default tokenizer's shards: one JSON line with steps/s, tokens/s and the wall
time of a whole probe run (training, final validation, samples, reports) with ``probe_model=gpt_small``
on the CPU preset.

    python benchmarks/probe.py [--pretrained DIR] [--train-images 2000] [--val-images 256] [--steps 200]
                               [--batch-size 32] [--threads N]

Shards: ``tokenize_dataset`` of the sample data (32 px crops -> 8x8 tokens, 1024 codes). ``--pretrained``
names a trained default tokenizer (``export.py`` output); without it the default architecture with
seeded random weights tokenizes: the probe's speed depends on the token shape and vocabulary only, not
on what the tokens mean (its NLL figures then say nothing about a tokenizer). gFID is off (it times
the Inception network, not the probe).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "imagetok" / "configs"


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(name, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cpu_threads=auto)")
    args = parser.parse_args()

    from imagetok import Tokenizer
    from imagetok.probe.run import probe
    from imagetok.tokenize_dataset import tokenize
    from imagetok.training.run import tokenizer_config

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pretrained = args.pretrained
        if pretrained is None:
            torch.manual_seed(0)
            pretrained = str(Tokenizer.from_config(tokenizer_config(_compose("train", []))).save_pretrained(work / "tok"))
        started = time.perf_counter()
        for split, count in (("train", args.train_images), ("val", args.val_images)):
            tokenize(_compose("tokenize_dataset", [f"pretrained={pretrained}", f"out={work / split}", f"split={split}",
                                                   f"num_images={count}", "data.val_samples=%d" % args.val_images]))
        tokenize_s = time.perf_counter() - started
        threads = f"cpu_threads={args.threads}" if args.threads else "cpu_threads=auto"
        cfg = _compose("probe", [f"tokens={work / 'train'}", f"val_tokens={work / 'val'}", "probe_model=gpt_small",
                                 "trainer=cpu", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
                                 f"data.batch_size={args.batch_size}", "sample.num_samples=16", "fid.enabled=false",
                                 "+trainer.enable_progress_bar=false", "~logger", threads])
        started = time.perf_counter()
        run = probe(cfg, work / "run")
        wall = time.perf_counter() - started
    m = run.metrics
    positions = 1
    for n in m["layout"]["token_shape"]:  # sub-tokens per image: L positions x K
        positions *= n
    print(json.dumps({
        "case": "probe gpt_small, default tokenizer shards", "tokenizer": args.pretrained or "default architecture, random weights",
        "token_shape": m["layout"]["token_shape"], "codebook_sizes": m["layout"]["codebook_sizes"],
        "parameters": m["parameters"], "train_images": m["train_images"], "batch_size": args.batch_size,
        "steps": m["steps"], "train_s": m["train_seconds"], "steps_per_s": round(m["steps"] / m["train_seconds"], 2),
        "tokens_per_s": round(m["steps"] * args.batch_size * positions / m["train_seconds"]),
        "probe_wall_s": round(wall, 1), "tokenize_s": round(tokenize_s, 1), "torch_threads": torch.get_num_threads(),
        "val_bits_per_position": round(m["final"]["bits_per_position"], 4),
        "unigram_entropy_bits_per_position": round(m["final"]["unigram_entropy_bits_per_position"], 4)}))


if __name__ == "__main__":
    main()
