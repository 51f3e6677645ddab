"""Progress of a batch-inference stage as plain lines: done / total, images/s, ETA.

Lines rather than a redrawn bar: a stage runs for hours under ``ray job submit``, whose logs
(``ray job logs``, CI logs, files) keep every write; a line every ``interval`` seconds reads the
same there as on a terminal. Ray Data's own progress output (hundreds of ``logging_progress``
lines) is switched off by :func:`quiet_ray_data` unless asked for.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

__all__ = ["Progress", "quiet_ray_data"]


class Progress:
    """``add(n)`` as images finish; a line at most every ``interval`` seconds, and one at
    :meth:`close` (``log``: where lines go)."""

    def __init__(self, stage: str, total: int, log: Callable[[str], None], interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.stage, self.total, self.log, self.interval, self.clock = stage, int(total), log, float(interval), clock
        self.done = 0
        self.started = self.last = clock()

    def add(self, count: int) -> None:
        self.done += int(count)
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.log(self.line(now))

    def close(self) -> None:
        self.log(self.line(self.clock()))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = self.total - self.done
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
        return (f"{self.stage}: {self.done}/{self.total} images{share}, {rate:.2f} images/s, "
                f"{_duration(elapsed)} elapsed{eta}")  # fmt: skip


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's progress bars and per-dataset INFO lines off in this driver (``verbose``:
    left as Ray sets them)."""
    if verbose:
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
