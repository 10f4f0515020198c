"""Checkpoints of other projects -> imagetok :class:`~imagetok.tokenizer.Tokenizer`: one module per
source project, each registering its format (detector + converter) in :mod:`.registry`; files are read
by :func:`.loading.load_original_checkpoint` (``weights_only``, foreign pickled classes made inert).

A new source project adds a module here that calls ``register(...)`` and one import line below.
"""

from imagetok.export.converters import diffusers, imagetok_training, llamagen, magvit2, taming, titok, var  # noqa: F401  (registration order)
from imagetok.export.converters.diffusers import convert_diffusers
from imagetok.export.converters.llamagen import convert_llamagen
from imagetok.export.converters.loading import load_original_checkpoint
from imagetok.export.converters.magvit2 import convert_magvit2
from imagetok.export.converters.registry import FORMATS, convert_checkpoint, detect_format
from imagetok.export.converters.taming import convert_taming
from imagetok.export.converters.titok import convert_titok
from imagetok.export.converters.var import convert_var

__all__ = ["FORMATS", "convert_checkpoint", "convert_diffusers", "convert_llamagen", "convert_magvit2", "convert_taming",
           "convert_titok", "convert_var", "detect_format", "load_original_checkpoint"]
