"""imagetok's own Lightning training checkpoints (``python train.py`` writes them): recognised here so
that ``from=auto`` knows them; :func:`imagetok.export.run.export` exports them itself."""

from __future__ import annotations

from typing import Any

from imagetok.export.converters.registry import SourceFormat, register


def is_imagetok_training_checkpoint(checkpoint: Any) -> bool:
    return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and isinstance(checkpoint.get("hyper_parameters"), dict)
            and "tokenizer_config" in checkpoint["hyper_parameters"])


register(SourceFormat("imagetok", '{"state_dict": ..., "hyper_parameters": {"tokenizer_config": ...}}, as train.py writes',
                      is_imagetok_training_checkpoint, convert=None))
