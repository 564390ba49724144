"""Clocks bound at import, so a suite that freezes ``time`` cannot distort our figures.

freezegun and time-machine replace ``time.time``/``time.monotonic`` (and module attributes
that alias them) while a test runs; they leave ``clock_gettime`` for these clock ids alone.
"""

from __future__ import annotations

import sys
import time

# The longest wait or interval the plugin accepts (about 3 years): thread waits and clock
# arithmetic overflow above about 9.2e9 s, so every option and timeout= is checked against
# a bound well below that.
MAX_SECONDS = 1e8

if sys.platform != "win32":
    _clock_gettime = time.clock_gettime
    _MONOTONIC = time.CLOCK_MONOTONIC
    _REALTIME = time.CLOCK_REALTIME

    def monotonic() -> float:
        """Seconds on the system-wide monotonic clock (comparable across processes)."""
        return _clock_gettime(_MONOTONIC)

    def wall() -> float:
        """Seconds since the epoch, read from the real clock even under a frozen ``time``."""
        return _clock_gettime(_REALTIME)

else:  # pragma: no cover - Windows has no clock_gettime
    # The functions themselves are bound now, before any test can replace the module's
    # attributes; freezegun patches ``time.time``, not the function object held here.
    monotonic = time.monotonic
    wall = time.time
