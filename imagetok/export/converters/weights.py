"""Putting a converted checkpoint's tensors into the :class:`Tokenizer` its converter built."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from imagetok.errors import CheckpointError
from imagetok.export.pretrained import key_mismatch_report
from imagetok.tokenizer import Tokenizer


def load_converted_weights(tokenizer: Tokenizer, tensors: Mapping[str, torch.Tensor], what: str,
                           codebook: str = "quantizer.codebook") -> Tokenizer:
    """Load ``tensors`` (named as ``tokenizer.state_dict()``) into ``tokenizer`` and return it in eval mode.

    The quantizer's training state (EMA statistics, usage windows, bit frequencies: every entry under
    the module that owns ``codebook``, except the codebook itself) has no counterpart in another
    project's file and keeps its defaults; every other entry must be in ``tensors`` with its shape, or
    the conversion stops with one :class:`CheckpointError` line saying that ``what`` does not fit. A
    converted codebook is marked initialised, so that training it further never re-runs k-means."""
    owner = codebook.rpartition(".")[0]
    prefix = f"{owner}."
    own = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith(prefix) or k == codebook}
    report = key_mismatch_report(own, dict(tensors))
    if report:
        first = "; ".join(line.strip() for line in report.splitlines()[:6])  # one line: the CLI shows one
        raise CheckpointError(f"{what} does not fit the architecture its tensors imply: {first}")
    tokenizer.load_state_dict(dict(tensors), strict=False)
    initialized = getattr(tokenizer.get_submodule(owner), "initialized", None)
    if codebook in own and isinstance(initialized, torch.Tensor):
        initialized.fill_(True)
    return tokenizer.eval()
