"""Corrupt-sample policy shared by the ImageFolder and webdataset datamodules: an image that cannot be
decoded is skipped, counted and logged with its name (file path, or key and shard); the run stops only
once the skipped fraction exceeds ``max_corrupt_fraction``."""

from __future__ import annotations

import logging
from collections import deque

from imagetok.errors import ImageLoadError, check

log = logging.getLogger(__name__)


class CorruptDataError(ImageLoadError):
    """Too many samples could not be decoded; the message gives the fraction, the limit and the last bad ones."""


class CorruptSampleGuard:
    """Counts samples read and samples skipped, in this process only: each DataLoader worker holds its
    own copy, so the limit applies per worker (and per rank), to the samples that worker has read.

    The run fails when ``skipped > max_fraction * max(seen, min_seen)``: never while the skipped
    fraction is within the limit, and never on the first bad sample of a run that has read fewer than
    ``min_seen`` samples unless ``max_fraction`` is 0 (then any bad sample fails).

    Args:
        max_fraction: largest tolerated ``skipped / seen``, in [0, 1].
        min_seen: number of samples over which early failures are averaged.
    """

    def __init__(self, max_fraction: float = 0.01, min_seen: int = 100, keep: int = 5) -> None:
        check(0.0 <= max_fraction <= 1.0, "max_corrupt_fraction", max_fraction, "a fraction in [0, 1]")
        check(isinstance(min_seen, int) and min_seen >= 1, "corrupt_min_seen", min_seen, "an integer >= 1")
        self.max_fraction, self.min_seen = float(max_fraction), min_seen
        self.seen, self.skipped = 0, 0
        self.last_bad: deque[str] = deque(maxlen=keep)

    def saw(self, sample=None):
        """Count one sample about to be decoded; returns it unchanged (usable as a pipeline map)."""
        self.seen += 1
        return sample

    def skip(self, name: str, error: BaseException) -> None:
        """Record one undecodable sample; raise :class:`CorruptDataError` once there are too many."""
        self.skipped += 1
        self.last_bad.append(name)
        log.warning("skipped corrupt sample %s (%s: %s); %d of %d samples skipped so far in this process",
                    name, type(error).__name__, error, self.skipped, self.seen)
        if self.skipped > self.max_fraction * max(self.seen, self.min_seen):
            raise CorruptDataError(
                f"{self.skipped} of {self.seen} samples could not be decoded ({self.skipped / max(self.seen, 1):.1%}), "
                f"above data.max_corrupt_fraction={self.max_fraction} (judged over at least data.corrupt_min_seen="
                f"{self.min_seen} samples, per DataLoader worker); last bad samples: {', '.join(self.last_bad)}")

    def webdataset_handler(self, error: Exception) -> bool:
        """A webdataset ``handler=``: names the sample by the key and shard that webdataset's
        ``DecodingError`` carries (or the shard, for a shard that cannot be opened or read), skips it
        (returns True) or raises."""
        key, url = getattr(error, "key", None), getattr(error, "url", None)
        if key is not None:
            name = f"{key} in {url}"
        elif len(error.args) >= 2 and isinstance(error.args[-1], str):  # webdataset appends (stream, url)
            name = f"shard {error.args[-1]}"
        else:
            name = str(error)
        self.skip(name, error.__cause__ or error)
        return True
