"""Test-only NaN injection for CLI runs, across every process of a run.

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one, so a
test that puts this folder on ``PYTHONPATH`` reaches ``train.py`` and also the ranks Lightning's DDP
launcher starts from it (they inherit the environment), which monkeypatching in the test cannot.
Nothing here is part of imagetok; without ``NAN_AT_STEP`` in the environment it does nothing.

Environment:
    NAN_AT_STEP: generator step (int) at which ``VQGANLoss.generator_loss`` returns a NaN pixel term
        and so a NaN total, after the real forward pass; once (a skipped step repeats with the next batch).
    NAN_RANK: only this global rank gets the NaN (default: every rank).
    CKPT_RECORD: at that moment, write the sha256 of every file in ``$RUN_DIR/checkpoints`` there (JSON).
    EXIT_RECORD: a folder; a rank that calls ``sys.exit(code)`` writes ``code`` to ``rank<r>`` in it.
"""

import os

if os.environ.get("NAN_AT_STEP"):
    import hashlib
    import json
    import sys
    from pathlib import Path

    import torch.distributed as dist
    from lightning.pytorch.utilities import rank_zero_only

    from imagetok.losses.vqgan import VQGANLoss

    _original = VQGANLoss.generator_loss
    _injected: list[int] = []

    def _rank() -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else rank_zero_only.rank

    def generator_loss(self, images, recon, quant, step, last_layer=None):
        total, logs = _original(self, images, recon, quant, step, last_layer)
        wanted = os.environ.get("NAN_RANK")
        if step == int(os.environ["NAN_AT_STEP"]) and not _injected and (wanted is None or int(wanted) == _rank()):
            _injected.append(step)
            if os.environ.get("CKPT_RECORD"):
                folder = Path(os.environ["RUN_DIR"]) / "checkpoints"
                digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
                Path(os.environ["CKPT_RECORD"]).write_text(json.dumps(digests))
            nan = total.new_tensor(float("nan"))
            total, logs = total + nan, dict(logs, pixel=nan, total=nan)
        return total, logs

    VQGANLoss.generator_loss = generator_loss

    if os.environ.get("EXIT_RECORD"):
        _exit = sys.exit

        def _recording_exit(code=None):
            Path(os.environ["EXIT_RECORD"], f"rank{rank_zero_only.rank}").write_text(str(code))
            _exit(code)

        sys.exit = _recording_exit
