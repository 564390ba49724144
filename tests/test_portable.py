"""PYTEST_PREWARM_PORTABLE=1 really takes the portable code path (Windows', macOS').

Each test forces the path for itself, so the normal run tests the portable code too, and
where fcntl and /proc exist a control shows that the check tells the two paths apart:
waiters poll instead of parking a ``prewarm-watch:`` thread in a blocking shared flock, and
a holder is identified by psutil's create_time instead of /proc start ticks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import LEAKY_ENV, Suite, wait_until

from pytest_prewarm import clock, flock, liveness, portable
from pytest_prewarm.layout import Layout
from pytest_prewarm.liveness import Liveness, Verdict
from pytest_prewarm.owner import OwnerRecord

LINUX = sys.platform.startswith("linux")


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(portable.PORTABLE_ENV, "1")


@pytest.fixture
def unforced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Linux path, even in a run with the portable path forced."""
    monkeypatch.delenv(portable.PORTABLE_ENV, raising=False)


WATCH = "prewarm-watch:portable.0"  # flock names a watch thread after the lock file


def watch_threads() -> list[threading.Thread]:
    """This module's watch threads (another test's abandoned watch may still be parked)."""
    return [t for t in threading.enumerate() if t.name.startswith(WATCH)]


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[flock.FlockLock, flock.FlockLock]]:
    """(holder, waiter): two locks of one template in this process; the holder holds it."""
    layout = Layout(tmp_path / "lock-dir")
    layout.ensure()
    holder = flock.FlockLock(layout, "portable.0", "portable")
    waiter = flock.FlockLock(layout, "portable.0", "portable")
    assert holder.try_acquire(liveness.own_record("holder", "run")) is not None
    assert waiter.try_acquire(liveness.own_record("waiter", "run")) is None  # flock excludes
    try:
        yield holder, waiter
    finally:
        holder.release()
        waiter.release()
        waiter.stop_waiting()
        wait_until(lambda: not watch_threads(), 10, what="watch threads to end")


def test_the_variable_is_not_stripped_from_inner_runs_and_children() -> None:
    assert portable.PORTABLE_ENV not in LEAKY_ENV


def test_forced_means_no_fcntl_for_the_lock_code(forced: None) -> None:
    assert portable.forced()
    assert portable.fcntl_module() is None


def test_without_an_importable_fcntl_the_lock_code_has_none(
    unforced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: import fcntl fails

    assert not portable.forced()
    assert portable.fcntl_module() is None


def test_a_forced_waiter_polls_and_parks_no_watch_thread(
    forced: None, held: tuple[flock.FlockLock, flock.FlockLock]
) -> None:
    holder, waiter = held
    start = clock.monotonic()
    waiter.wait_for_change(start + 5.0)
    # One poll interval, not the whole bound: the holder has not released.
    assert clock.monotonic() - start < 1.0
    assert watch_threads() == []
    threading.Timer(0.05, holder.release).start()
    deadline = start + 10.0
    while waiter.try_acquire(liveness.own_record("waiter", "run")) is None:
        assert clock.monotonic() < deadline, "the polling waiter never got the lock"
        waiter.wait_for_change(deadline)
        assert watch_threads() == []
    assert waiter.held_by() is not None


@pytest.mark.skipif(not LINUX, reason="control of the Linux path: needs fcntl and /proc")
def test_control_without_the_variable_a_waiter_parks_a_watch_thread(
    unforced: None, held: tuple[flock.FlockLock, flock.FlockLock]
) -> None:
    holder, waiter = held
    waiter.wait_for_change(clock.monotonic() + 0.05)
    assert [t.name for t in watch_threads()] == [f"prewarm-watch:{holder.lock_path.name}"]


def test_a_forced_record_is_identified_by_create_time(forced: None) -> None:
    record = liveness.own_record("gw0", "run")
    assert record.start_ticks is None
    assert record.create_time is not None
    assert abs(record.create_time - psutil.Process().create_time()) <= 0.005
    assert liveness.classify(record) == Verdict(Liveness.ALIVE, "running")
    # Start ticks alone prove nothing on this path (on the /proc path 1 is "pid reused").
    ticks_only = record._replace(start_ticks=1, create_time=None)
    assert liveness.classify(ticks_only) == Verdict(Liveness.UNKNOWN, "start time unrecorded")


@pytest.mark.skipif(not LINUX, reason="control of the Linux path: needs fcntl and /proc")
def test_control_without_the_variable_a_record_has_start_ticks(unforced: None) -> None:
    record = liveness.own_record("gw0", "run")
    assert record.start_ticks == liveness.start_ticks(os.getpid())
    ticks_only = record._replace(create_time=None)
    assert liveness.classify(ticks_only) == Verdict(Liveness.ALIVE, "running")


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A live child process, killed and reaped after the test (on every platform)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def record_of(child: subprocess.Popen[bytes]) -> OwnerRecord:
    """An owner record naming ``child`` as the portable path writes one: by create_time."""
    return liveness.own_record("gw0", "run")._replace(
        pid=child.pid,
        create_time=psutil.Process(child.pid).create_time(),
    )


def test_a_forced_record_of_a_pid_started_a_linux_tick_later_is_a_reused_pid(
    forced: None, child: subprocess.Popen[bytes]
) -> None:
    record = record_of(child)
    assert liveness.classify(record) == Verdict(Liveness.ALIVE, "running")
    for moved in (-0.01, 0.01, -1.0):  # one tick of Linux's USER_HZ either way, a second
        verdict = liveness.classify(record._replace(create_time=record.create_time + moved))
        assert verdict == Verdict(Liveness.DEAD, "pid reused by a newer process"), moved


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and zombies are POSIX")
def test_a_forced_holder_killed_is_dead_as_a_zombie_and_after_its_reaping(
    forced: None, child: subprocess.Popen[bytes]
) -> None:
    record = record_of(child)
    child.kill()  # SIGKILL, not reaped yet
    wait_until(
        lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE,
        what=f"pid {child.pid} to become a zombie",
    )
    assert liveness.classify(record) == Verdict(Liveness.DEAD, psutil.STATUS_ZOMBIE)
    child.wait(timeout=30)
    verdict = liveness.classify(record)
    assert verdict.state is Liveness.DEAD
    if not psutil.pid_exists(child.pid):  # else the pid was reused already
        assert verdict.reason == "no such process"


INNER_CONFTEST = """
    import json

    import pytest

    import prewarm_probe as probe
    from pytest_prewarm.layout import Layout


    def build(path):
        lock_dir, tid = path.parents[3], path.parents[1].name
        owner = Layout(lock_dir).owner_file(tid)
        probe.record("build", owner=json.loads(owner.read_text()))
        return None


    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        return prewarmed_template("db", build)
"""

INNER_TESTS = """
    import os

    import prewarm_probe as probe
    from pytest_prewarm import portable


    def test_uses_template(db):
        probe.record("seen", forced=portable.forced(), variable=os.environ.get(
            portable.PORTABLE_ENV))
"""


def test_the_outer_variable_reaches_the_workers_of_an_inner_xdist_run(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set in this process only, as the CI job sets it: no test passes it on by hand."""
    monkeypatch.setenv(portable.PORTABLE_ENV, "1")
    suite.write(conftest=INNER_CONFTEST, test_db=INNER_TESTS)
    result = suite.run("-n", "2")
    result.assert_outcomes(passed=1)
    (seen,) = suite.records("seen")
    assert seen["forced"] is True
    assert seen["variable"] == "1"
    assert seen["worker"].startswith("gw")
    (build,) = suite.records("build")
    assert build["owner"]["start_ticks"] is None
    assert isinstance(build["owner"]["create_time"], float)
    assert build["owner"]["pid"] == build["pid"]
