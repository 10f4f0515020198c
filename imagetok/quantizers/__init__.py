"""Quantizer families; every one returns :class:`QuantizerOutput` (see ``base.py``)."""

from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.vq import VectorQuantizer

__all__ = ["Quantizer", "QuantizerOutput", "VectorQuantizer"]
