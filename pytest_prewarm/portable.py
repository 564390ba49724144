"""Whether this process takes the portable code path, as Windows and macOS do.

Linux has fcntl (a blocking shared flock wakes waiters) and /proc (start ticks identify a
process). Where either is missing, waiters poll and liveness asks psutil. Setting
PYTEST_PREWARM_PORTABLE=1 forces that path on Linux, so it is tested where CI runs.
"""

from __future__ import annotations

import os
from types import ModuleType

PORTABLE_ENV = "PYTEST_PREWARM_PORTABLE"


def forced() -> bool:
    return bool(os.environ.get(PORTABLE_ENV))


def fcntl_module() -> ModuleType | None:
    """The fcntl module, unless it is missing or the portable path is forced."""
    if forced():
        return None
    try:
        import fcntl
    except ImportError:  # Windows, or a platform (or a test) without it
        return None
    return fcntl
