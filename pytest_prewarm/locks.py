"""Choosing the lock implementation for a lock mode, once per process."""

from __future__ import annotations

from collections.abc import Callable

from .kinds import LockMode
from .layout import Layout
from .locking import Lock

# (layout, template id, template name) -> the lock of that template
LockFactory = Callable[[Layout, str, str], Lock]


def lock_factory(mode: LockMode, *, stale_after: float, heartbeat: float) -> LockFactory:
    """The constructor of every template lock of this process, for ``mode``.

    The lease module is imported only in lease mode: most runs never need it.
    """
    if mode is LockMode.LEASE:
        from .lease import LeaseLock

        def lease(layout: Layout, tid: str, name: str) -> Lock:
            return LeaseLock(
                layout.lease_dir(tid), name, stale_after=stale_after, heartbeat=heartbeat
            )

        return lease
    if mode is not LockMode.FLOCK:
        raise ValueError(f"no lock implementation for mode {mode!r}")
    from .flock import FlockLock

    def flock(layout: Layout, tid: str, name: str) -> Lock:
        return FlockLock(layout, tid, name)

    return flock
