"""A ``timeout=`` in the call keeps the invariant the configured timeout keeps.

The stale window (how long a lease holder of unknown liveness may leave its heartbeat
still before it is taken over) must stay below every wait, or a holder that died where
its death cannot be proven makes the waiter time out instead of taking over. A derived
window is derived again from the call's timeout; an explicit one that is not below it is a
usage error at the call. And a timeout message never promises a takeover "at once" that
the waiter cannot make. Holders are real processes (tests/_workers.py), in another pid
namespace where liveness is unknown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _workers import Arena
from conftest import require_unshare

from pytest_prewarm import locks
from pytest_prewarm.config import MIN_HEARTBEATS as config_min_heartbeats
from pytest_prewarm.config import Settings, heartbeat_for
from pytest_prewarm.exceptions import PrewarmTimeout, PrewarmUsageError
from pytest_prewarm.lockdir import prepare
from pytest_prewarm.request import CALL_TIMEOUT, Request, TemplateStore

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="liveness proofs come from Linux /proc"
)
PID_NS = ("--pid", "--fork", "--mount-proc", "--kill-child")


def require_pid_namespace() -> list[str]:
    return require_unshare(*PID_NS)


@pytest.mark.parametrize("timeout", ["0.5", "5", "100", "120", "1800", "7200"])
def test_the_lock_timings_agree_with_the_ones_config_derives(pytester, timeout):
    settings = Settings.from_config(pytester.parseconfig(f"--prewarm-timeout={timeout}"))

    assert settings.stale_after.source.startswith("default")
    assert locks.default_stale_after(float(timeout)) == settings.stale_after.value
    assert locks.heartbeat_for(settings.stale_after.value) == settings.heartbeat
    assert config_min_heartbeats == locks.MIN_HEARTBEATS
    assert locks.heartbeat_for(settings.stale_after.value) == heartbeat_for(
        settings.stale_after.value
    )


INNER_CONFTEST = """
    import pytest

    def build(path):
        (path / "manifest.json").write_text("{}")
        return {"by": "inner"}

    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        return prewarmed_template("db", build, key="k", timeout=10)
"""


@linux_only
def test_a_call_timeout_below_the_default_stale_window_derives_its_own(tmp_path, suite):
    wrap = require_pid_namespace()
    arena = Arena(tmp_path / "arena", suite.processes)
    prepare(arena.lock_dir, "--prewarm-lock-dir")  # as the inner run's own would be
    holder = arena.start("holder", wrap=tuple(wrap), mode="lease", block="before", heartbeat=0.1)
    arena.wait_flag("blocked-holder")
    arena.kill("holder")  # unshare, and with it (--kill-child) the holder, pid 1 inside
    holder.popen.wait(timeout=30)
    suite.write(conftest=INNER_CONFTEST, test_db="def test_db(db):\n    assert db.value\n")

    # Default settings: timeout 1800 s, so the configured stale window is 60 s, longer
    # than the 10 s this call waits. The call's own window is min(60, 10 / 2) = 5 s,
    # raised to 3 of the configured 2 s heartbeats: 6 s.
    result = suite.run(
        "-p",
        "no:xdist",
        "--prewarm-lock-mode=lease",
        "--prewarm-json=report.json",
        "--prewarm-lock-dir",
        str(arena.lock_dir),
        lock_dir=False,
        timeout=60,
    )

    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    report = json.loads((suite.path / "report.json").read_text())
    (built,) = [e for e in report["events"] if e["outcome"] == "built"]
    assert built["recovered_from"].startswith(
        "holder, pid 1: unknown, it runs in another pid namespace; heartbeat still for "
    )
    assert 6 <= built["wait_seconds"] < 10
    assert report["settings"]["stale_after"] == 60  # the process's window is unchanged


def test_an_explicit_stale_window_above_a_call_timeout_fails_the_test_that_asks(suite):
    suite.write(conftest=INNER_CONFTEST, test_db="def test_db(db):\n    assert db.value\n")

    result = suite.run("-p", "no:xdist", "--prewarm-stale-after=12", timeout=60)

    out = result.stdout.str()
    assert result.ret == 1, out
    assert (
        "the timeout 10 s (from timeout= in the call) must be above the stale window 12 s "
        "(from --prewarm-stale-after)"
    ) in out
    assert "INTERNALERROR" not in out


@linux_only
def test_a_short_call_timeout_never_takes_a_live_holders_lease_between_its_beats(arena):
    # The holder beats every 2 s, the configured default. A window derived from a 2 s
    # timeout alone (1 s) would call it stale between two beats and take its lease.
    wrap = require_pid_namespace()  # its liveness is unknown from here: only beats count
    arena.start("holder", wrap=tuple(wrap), mode="lease", block="before", heartbeat=2.0)
    arena.wait_flag("blocked-holder")
    store = lease_store(arena.lock_dir, 60.0, "default: min(60, timeout / 2), timeout from default")

    assert store.stale_window(call_request(2.0)) is None  # no window fits: keep 60 s
    with pytest.raises(PrewarmTimeout) as caught:
        store.get(call_request(2.0))

    assert "stale window of 60 s, not at once" in str(caught.value)
    arena.release("holder")
    holder = arena.result("holder")
    assert holder["ok"], holder  # it kept its lease and published
    assert store.stale_window(call_request(10.0)) == 6.0  # 3 beats of 2 s, below 10 s


def call_request(timeout: float) -> Request:
    return Request("db", lambda path: None, "k", timeout, CALL_TIMEOUT)


def lease_store(lock_dir: Path, stale_after: float, source: str) -> TemplateStore:
    """A lease-mode store with the stale window ``stale_after`` from ``source``, beating 2 s."""
    return TemplateStore(
        lock_dir,
        run_id="run",
        worker="gw0",
        lock_mode="lease",
        stale_after=stale_after,
        heartbeat=2.0,
        stale_after_source=source,
    )


def test_an_explicit_stale_window_not_below_the_call_timeout_is_a_usage_error(tmp_path):
    store = lease_store(tmp_path / "locks", 60.0, "--prewarm-stale-after")

    with pytest.raises(PrewarmUsageError) as caught:
        store.get(call_request(60.0))

    assert str(caught.value) == (
        "template 'db': the timeout 60 s (from timeout= in the call) must be above the "
        "stale window 60 s (from --prewarm-stale-after), or a holder of unknown liveness "
        "that died would make this wait time out instead of taking over; pass a larger "
        "timeout=, or lower --prewarm-stale-after"
    )
    assert list((tmp_path / "locks" / "locks").iterdir()) == []  # nothing was locked


def test_an_explicit_stale_window_below_the_call_timeout_is_kept(tmp_path):
    store = lease_store(tmp_path / "locks", 4.0, "--prewarm-stale-after")

    assert store.stale_window(call_request(5.0)) is None  # the process's own, 4 s
    assert store.get(call_request(5.0)).origin == "built"


@linux_only
def test_a_timeout_behind_a_holder_of_unknown_liveness_promises_no_takeover_at_once(arena):
    wrap = require_pid_namespace()
    arena.start("holder", wrap=tuple(wrap), mode="lease", block="before", heartbeat=0.1)
    arena.wait_flag("blocked-holder")
    arena.start("waiter", mode="lease", stale_after=1.5, heartbeat=0.1, timeout=2.0)

    waiter = arena.result("waiter")

    assert waiter["error_type"] == "PrewarmTimeout", waiter
    # Alive and beating in its namespace: killing it would free the lease only after its
    # heartbeat stood still for the stale window, and the message says exactly that.
    assert "taken over at once" not in waiter["error"]
    assert waiter["error"].endswith(
        "or stop it: its death cannot be proven from here (it runs in another pid "
        "namespace), so its lease is taken over only once its heartbeat has stood still "
        "for the stale window of 1.5 s, not at once."
    )
    arena.release("holder")
    assert arena.result("holder")["ok"]


@pytest.fixture
def arena(tmp_path: Path, processes) -> Arena:
    return Arena(tmp_path / "arena", processes)
