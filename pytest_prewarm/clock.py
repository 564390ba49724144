"""Clocks bound at import, so a suite that freezes ``time`` cannot distort our figures.

freezegun and time-machine replace ``time.time``/``time.monotonic`` (and module attributes
that alias them) while a test runs; they leave ``clock_gettime`` for these clock ids alone.
"""

from __future__ import annotations

import time

_clock_gettime = time.clock_gettime
_MONOTONIC = time.CLOCK_MONOTONIC
_REALTIME = time.CLOCK_REALTIME


def monotonic() -> float:
    """Seconds on the system-wide monotonic clock (comparable across processes on Linux)."""
    return _clock_gettime(_MONOTONIC)


def wall() -> float:
    """Seconds since the epoch, read from the real clock even under a frozen ``time``."""
    return _clock_gettime(_REALTIME)
