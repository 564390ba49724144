"""Live lines that must reach the terminal even from xdist workers, whose output is captured.

pytest's capture replaces fd 2 with a temporary file while tests run, and an xdist worker's
own stdout is its channel to the controller. The worker's original fd 2, however, is the
controller's stderr (execnet leaves it inherited). So we duplicate fd 2 when the plugin is
imported, which happens before capture starts, and write live lines there.
"""

from __future__ import annotations

import contextlib
import os
import threading

_lock = threading.Lock()
try:
    _fd: int | None = os.dup(2)  # non-inheritable by default, so children don't keep it
except OSError:  # pragma: no cover - no stderr at all (daemonised interpreter)
    _fd = None


def emit(line: str) -> None:
    """Write one line to the real stderr; never raise (a report must not fail a test)."""
    if _fd is None:
        return
    data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
    with _lock, contextlib.suppress(OSError):
        os.write(_fd, data)
