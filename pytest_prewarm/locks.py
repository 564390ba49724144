"""Choosing the lock implementation for a lock mode, once per process; the lease's timings.

The module loads nothing at import time (its imports are for annotations, or inside the
function that needs them), so the timing rules below cost a caller nothing to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .kinds import LockMode
    from .layout import Layout
    from .locking import Lock

# The same rules as config.py's default stale window (``_stale_after``) and its
# ``heartbeat_for``: config sits above this module (the pytest edge) and cannot be imported
# from request code. tests/test_call_timeout.py checks that the two copies agree.


def default_stale_after(timeout: float) -> float:
    """The stale window for ``timeout`` when none is set: min(60, timeout / 2).

    Half the wait leaves a waiter the other half to take over from a holder of unknown
    liveness whose heartbeat stopped, instead of timing out behind it.
    """
    return min(60.0, timeout / 2)


# config.MIN_HEARTBEATS: a stale window shorter than this many beats misjudges a slow beat.
MIN_HEARTBEATS = 3


def heartbeat_for(stale_after: float) -> float:
    """Lease heartbeat interval: a fifth of the stale window, within [0.02, 2] s."""
    return min(2.0, max(0.02, stale_after / 5))


class LockFactory(Protocol):
    """(layout, template id, template name) -> the lock of that template.

    ``stale_after`` overrides the process's stale window for this one lock (a request
    whose own ``timeout=`` needs a shorter one); the heartbeat follows it. Locks without a
    stale window (flock) ignore it.
    """

    def __call__(
        self, layout: Layout, tid: str, name: str, *, stale_after: float | None = None
    ) -> Lock: ...


def lock_factory(mode: LockMode, *, stale_after: float, heartbeat: float) -> LockFactory:
    """The constructor of every template lock of this process, for ``mode``.

    The lease module is imported only in lease mode: most runs never need it.
    """
    from .kinds import LockMode

    configured = stale_after
    if mode is LockMode.LEASE:
        from .lease import LeaseLock

        def lease(layout: Layout, tid: str, name: str, *, stale_after: float | None = None) -> Lock:
            if stale_after is None:
                window, beat = configured, heartbeat
            else:
                # Beat as often as config would for this window, or a waiter using it
                # could judge a holder stale between two beats.
                window, beat = stale_after, heartbeat_for(stale_after)
            return LeaseLock(layout.lease_dir(tid), name, stale_after=window, heartbeat=beat)

        return lease
    if mode is not LockMode.FLOCK:
        raise ValueError(f"no lock implementation for mode {mode!r}")
    from .flock import FlockLock

    def flock(layout: Layout, tid: str, name: str, *, stale_after: float | None = None) -> Lock:
        return FlockLock(layout, tid, name)  # the kernel frees it when its holder dies

    return flock
