"""What the command-line tools print: one copy of each line, without Lightning's advertising."""

from __future__ import annotations

import logging

# Lines Lightning prints on every run that say nothing about this run (or advertise a product).
_NOISE = ("💡 Tip", "litlogger", "GPU available: False", "TPU available: False", "HPU available: False",
          "`Trainer(limit_val_batches=1.0)` was configured")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE)


class _DropInfo(logging.Filter):
    """Ranks > 0: their INFO lines repeat rank 0's. Warnings stay, and so do DEBUG lines, which only
    exist when the user asked for them (``hydra.verbose=...``) and are often about that rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.INFO


def quiet_console(rank: int = 0) -> None:
    """Route Lightning's messages through the one (Hydra) root handler instead of also through its own
    ``INFO: ...`` stream handler, which printed each line twice; drop the lines in ``_NOISE``; on
    ranks other than 0 drop INFO lines, so a multi-process run prints each line once."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(_DropNoise())
        if rank != 0 and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_DropInfo())
