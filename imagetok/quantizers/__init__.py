"""Quantizer families; every one returns :class:`QuantizerOutput` (see ``base.py``)."""

from imagetok.quantizers.base import Quantizer, QuantizerOutput
from imagetok.quantizers.dual import DualCodebookQuantizer
from imagetok.quantizers.factorized import FactorizedVectorQuantizer
from imagetok.quantizers.fsq import FiniteScalarQuantizer
from imagetok.quantizers.ibq import IndexBackpropQuantizer
from imagetok.quantizers.residual import ResidualVectorQuantizer
from imagetok.quantizers.simvq import SimVectorQuantizer
from imagetok.quantizers.vq import VectorQuantizer

__all__ = ["DualCodebookQuantizer", "FactorizedVectorQuantizer", "FiniteScalarQuantizer", "IndexBackpropQuantizer",
           "Quantizer", "QuantizerOutput", "ResidualVectorQuantizer", "SimVectorQuantizer", "VectorQuantizer"]
