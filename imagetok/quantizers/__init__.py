"""Quantizer families; every one returns :class:`QuantizerOutput` (see ``base.py``)."""

from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.fsq import FiniteScalarQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.quantizers.vq import VectorQuantizer

__all__ = ["FiniteScalarQuantizer", "Quantizer", "QuantizerOutput", "ResidualVectorQuantizer", "VectorQuantizer"]
