"""Host synchronisations inside training steps, recorded with ``imagetok.utils.host_sync``.

    python benchmarks/host_syncs.py [--device cpu|cuda] [--steps 6] [--from-step 3] [--out F] [OVERRIDE ...]

Trains ``--steps`` steps of the given recipe (Hydra overrides; default: the default recipe with LPIPS
on a random VGG and the discriminator from step 0) and records, from step ``--from-step`` on, every
call in ``training_step`` that would make the host wait for the device: ATen-level value reads,
data-dependent shapes and blocking copies, and on CUDA also what ``torch.cuda.set_sync_debug_mode``
reports. Prints one JSON line: the count per step and where each comes from. On CPU the same ops are
recorded (they are cheap there), which is what ``tests/test_performance.py`` checks.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--from-step", type=int, default=3, help="the first steps may sync (initialisation)")
    parser.add_argument("--out", help="also write the JSON line to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    import imagetok
    from imagetok.training.module import TokenizerTrainingModule
    from imagetok.training.run import train
    from imagetok.utils.host_sync import HostSyncRecorder

    overrides = ["data=sample", "logger=[]", f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0",
                 "checkpoint.every_n_steps=1000000", "loss.perceptual_weight=1.0", "loss.perceptual_random_backbone=true",
                 "loss.disc_start=0", f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}", *args.overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(imagetok.__file__).parent / "configs")):
        cfg = compose("train", overrides=overrides)

    syncs, steps = [], [0]
    original = TokenizerTrainingModule.training_step

    def training_step(self, batch, batch_idx):
        if batch_idx < args.from_step:
            return original(self, batch, batch_idx)
        steps[0] += 1
        with HostSyncRecorder() as recorder:
            out = original(self, batch, batch_idx)
        syncs.extend(recorder.syncs)
        return out

    TokenizerTrainingModule.training_step = training_step
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir)
    where = collections.Counter(f"{s.op} at {s.where}" for s in syncs)
    line = json.dumps({"benchmark": "host_syncs", "device": args.device, "overrides": args.overrides,
                       "recorded_steps": steps[0], "syncs_per_step": len(syncs) / max(1, steps[0]),
                       "where": dict(where.most_common())})
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
