"""imagetok: train, evaluate and export discrete image tokenizers."""

from imagetok.quantizers.base import QuantizerOutput
from imagetok.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["QuantizerOutput", "Tokenizer", "__version__"]
