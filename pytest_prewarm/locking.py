"""What the request code needs of a template's lock: a small protocol and its two results.

Two implementations fit it: ``flock.FlockLock`` (a kernel lock; the default) and
``lease.LeaseLock`` (claim files with a heartbeat, for filesystems where flock does not
exclude). ``locks.lock_factory`` picks one per process, once; request code never asks
which one it has.
"""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
from pathlib import Path
from typing import NamedTuple, Protocol

from .liveness import Verdict, held_for, local_host
from .owner import OwnerRecord


class Holder(NamedTuple):
    """What a waiter knows of the current holder, for messages and the report."""

    record: OwnerRecord | None
    verdict: Verdict
    # What stopping this holder would do, when it is not "taken over at once" (a lease
    # holder of unknown liveness waits out the stale window first). None: at once, as
    # flock and a provably dead lease holder are. The timeout message says it, so its
    # advice never promises a takeover the waiter cannot make.
    takeover: str | None = None

    def describe(self) -> str:
        if self.record is None:
            return f"no identifiable holder ({self.verdict.reason})"
        here = local_host().hostname
        return (
            f"held by {self.record.describe(local_hostname=here)}, {self.verdict}, "
            f"{held_for(self.record):.0f} s"
        )


class Acquired(NamedTuple):
    """The lock is ours. ``previous`` is the record of whoever held it before us."""

    previous: OwnerRecord | None
    previous_verdict: Verdict | None

    @property
    def took_over(self) -> bool:
        """True when the previous holder stopped without releasing: it died mid-build."""
        return self.previous is not None and self.previous.is_held

    def recovered_from(self) -> str | None:
        """``"gw2, pid 4100: dead, zombie"`` after a takeover, for the report; else None."""
        if not self.took_over or self.previous is None:
            return None
        who = f"{self.previous.worker}, pid {self.previous.pid}"
        return who if self.previous_verdict is None else f"{who}: {self.previous_verdict}"


class Lock(Protocol):
    """One template's cross-process lock, as the request code uses it."""

    template: str
    lock_path: Path  # named in messages

    def try_acquire(self, record: OwnerRecord) -> Acquired | None:
        """Take the lock without blocking, naming ``record`` as holder; None if taken."""

    def holder(self) -> Holder:
        """Who holds the lock now, as far as can be told (for messages)."""

    def wait_for_change(self, until: float) -> None:
        """Block until the holder may have let go, or until ``until`` (monotonic)."""

    def stop_waiting(self) -> None:
        """The wait is over (got it, or gave up): drop what waiting set up."""

    def held_by(self) -> OwnerRecord | None:
        """The record this process holds the lock with, or None."""

    def confirm_held(self, what: str) -> None:
        """Raise PrewarmLockError if the hold was lost (``what`` happens to the build)."""

    def release(self, *, finished: bool = False) -> None:
        """Let go. ``finished``: the published meta names this hold, so it ended cleanly."""
