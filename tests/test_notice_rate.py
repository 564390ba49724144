"""The "still waiting" notices of a wait come at a bounded rate, whatever the interval.

A tiny ``--prewarm-notice-after`` once made a wait that fell behind its notice schedule
print on every pass of its loop and stop sleeping: 4,327 lines in 3 s. The next notice is
due an interval after the last one, the interval is at least ``MIN_NOTICE_EVERY``, and
the loop keeps sleeping between looks. The holder is a real process on a real lock
(tests/_workers.py); the waiter is a TemplateStore in this process, so that its notices
and its looks at the lock can be counted.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import pytest
from _workers import Arena

from pytest_prewarm import clock, portable
from pytest_prewarm.exceptions import PrewarmTimeout
from pytest_prewarm.flock import POLL_INTERVAL as FLOCK_POLL
from pytest_prewarm.lease import POLL_INTERVAL
from pytest_prewarm.request import MIN_NOTICE_EVERY, Request, TemplateStore

WAIT = 1.5  # the waiter's timeout: it waits this long behind a holder that never lets go

MODES = ["flock", "lease"] if sys.platform.startswith("linux") else ["lease"]


class CountingLock:
    """A real template lock, with its non-blocking looks counted."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.tries = 0

    def try_acquire(self, record: Any) -> Any:
        self.tries += 1
        return self.lock.try_acquire(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lock, name)


@pytest.mark.parametrize("mode", MODES)
def test_a_tiny_notice_interval_prints_at_a_bounded_rate_and_the_wait_still_sleeps(
    tmp_path: Path, processes: Any, mode: str
) -> None:
    arena = Arena(tmp_path / "arena", processes)
    arena.start("holder", mode=mode, block="before", heartbeat=0.1)
    arena.wait_flag("blocked-holder")
    notices: list[float] = []
    store = TemplateStore(
        arena.lock_dir,
        run_id="run",
        worker="waiter",
        lock_mode=mode,
        notice_every=0.000001,
        on_notice=lambda name, waited, holder: notices.append(clock.monotonic()),
        stale_after=30.0,
        heartbeat=0.2,
    )
    locks: list[CountingLock] = []
    open_lock = store.open_lock

    def counting(*args: Any, **kwargs: Any) -> Any:
        locks.append(CountingLock(open_lock(*args, **kwargs)))
        return locks[-1]

    store.open_lock = counting  # type: ignore[assignment]
    start = clock.monotonic()

    with pytest.raises(PrewarmTimeout, match="held by holder"):
        store.get(Request("db", lambda path: None, "k", WAIT))

    waited = clock.monotonic() - start
    assert 2 <= len(notices) <= waited / MIN_NOTICE_EVERY + 1, len(notices)
    gaps = [b - a for a, b in itertools.pairwise(notices)]
    assert min(gaps) >= MIN_NOTICE_EVERY * 0.99, gaps
    # One look per wake-up: at a notice, or at each poll where the lock polls: the lease
    # dir in lease mode, and flock mode without fcntl (the portable path, as on Windows).
    (lock,) = locks
    if mode == "lease":
        polls = waited / POLL_INTERVAL
    else:
        polls = 0 if portable.fcntl_module() is not None else waited / FLOCK_POLL
    assert lock.tries <= polls + len(notices) + 5, lock.tries
    arena.release("holder")
    assert arena.result("holder")["ok"]
