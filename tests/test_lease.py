"""Lease mode: dead holders are reclaimed at once, live ones never, unknown ones by heartbeat.

Also the start-up invariant between --prewarm-stale-after, --prewarm-timeout and the
heartbeat, and --prewarm-lock-mode's validation.

The holders are real processes (tests/_workers.py) in this pid namespace, in another pid
namespace with the same hostname (``unshare --pid``), or in another UTS namespace with
another hostname (``unshare --uts``). A stopped heartbeat is a real SIGSTOP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from _workers import Arena, overlaps, proc_state, read_log, wait_until
from conftest import require_unshare

from pytest_prewarm.config import MIN_HEARTBEATS, heartbeat_for
from pytest_prewarm.exceptions import PrewarmLockError
from pytest_prewarm.lease import LeaseLock
from pytest_prewarm.liveness import Liveness, Verdict, own_record

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="liveness proofs come from Linux /proc"
)

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR
OTHER_HOST = "prewarm-other-host"


@pytest.fixture
def arena(tmp_path: Path, processes) -> Arena:
    return Arena(tmp_path / "arena", processes)


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: proc_state(pid) == "T", 30.0, f"pid {pid} to stop")


def events(result: dict, outcome: str) -> list[dict]:
    return [e for e in result["events"] if e["outcome"] == outcome]


# -- the invariant -------------------------------------------------------------------------


def run_usage_error(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("-p", "no:hypothesispytest", *args)
    assert result.ret == USAGE_ERROR, result.stdout.str() + result.stderr.str()
    return result


@pytest.mark.parametrize(
    ("stale", "timeout"), [("30", "30"), ("45", "30"), ("30.5", "30.25")], ids=str
)
def test_a_stale_window_not_below_the_timeout_on_the_command_line_is_a_usage_error(
    pytester, stale, timeout
):
    result = run_usage_error(
        pytester, f"--prewarm-stale-after={stale}", f"--prewarm-timeout={timeout}"
    )

    result.stderr.fnmatch_lines(
        [
            f"ERROR: prewarm: the stale window {float(stale):g} s (from --prewarm-stale-after) "
            f"must be below the timeout {float(timeout):g} s (from --prewarm-timeout); "
            "lower --prewarm-stale-after or raise --prewarm-timeout"
        ]
    )


def test_a_stale_window_not_below_the_timeout_in_the_ini_file_names_the_file(pytester):
    ini = pytester.makeini("[pytest]\nprewarm_stale_after = 20\nprewarm_timeout = 20\n")

    result = run_usage_error(pytester)

    result.stderr.fnmatch_lines(
        [
            f"ERROR: prewarm: the stale window 20 s (from ini prewarm_stale_after in {ini}) "
            f"must be below the timeout 20 s (from ini prewarm_timeout in {ini}); *"
        ]
    )


def test_a_command_line_stale_window_is_checked_against_the_ini_timeout(pytester):
    ini = pytester.makeini("[pytest]\nprewarm_timeout = 10\n")

    result = run_usage_error(pytester, "--prewarm-stale-after=12")

    result.stderr.fnmatch_lines(
        [
            "ERROR: prewarm: the stale window 12 s (from --prewarm-stale-after) must be "
            f"below the timeout 10 s (from ini prewarm_timeout in {ini}); *"
        ]
    )


def test_a_stale_window_beyond_the_default_timeout_names_the_default(pytester):
    result = run_usage_error(pytester, "--prewarm-stale-after=1800")

    result.stderr.fnmatch_lines(
        [
            "*the stale window 1800 s (from --prewarm-stale-after) must be below the timeout "
            "1800 s (from default)*"
        ]
    )


@pytest.mark.parametrize("stale", [0.01, 0.05])
def test_a_stale_window_shorter_than_three_heartbeats_is_a_usage_error(pytester, stale):
    beat = heartbeat_for(stale)
    assert MIN_HEARTBEATS >= 3
    assert stale < MIN_HEARTBEATS * beat  # the set-up: too short for the heartbeat

    result = run_usage_error(pytester, f"--prewarm-stale-after={stale}", "--prewarm-timeout=5")

    result.stderr.fnmatch_lines(
        [
            f"ERROR: prewarm: the stale window {stale:g} s (from --prewarm-stale-after) is "
            f"shorter than {MIN_HEARTBEATS} heartbeats of {beat:g} s; use at least "
            f"{MIN_HEARTBEATS * beat:g} s (timeout 5 s from --prewarm-timeout)"
        ]
    )


def test_the_smallest_stale_window_the_error_suggests_is_accepted(pytester):
    refused = run_usage_error(pytester, "--prewarm-stale-after=0.001", "--prewarm-timeout=5")
    suggested = re.search(r"use at least (\S+) s", refused.stderr.str())
    assert suggested is not None, refused.stderr.str()

    result = pytester.runpytest(
        "-p",
        "no:hypothesispytest",
        "-v",  # the settings line is in the header under -v (no template is used)
        f"--prewarm-stale-after={suggested[1]}",
        "--prewarm-timeout=5",
    )

    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines([f"prewarm: * stale window {suggested[1]} s"])


@pytest.mark.parametrize("where", ["command line", "ini"])
def test_an_unknown_lock_mode_is_a_usage_error_naming_the_choices(pytester, where):
    if where == "ini":
        ini = pytester.makeini("[pytest]\nprewarm_lock_mode = bogus\n")
        result = run_usage_error(pytester)
        source = f"ini prewarm_lock_mode in {ini}"
    else:
        result = run_usage_error(pytester, "--prewarm-lock-mode", "bogus")
        source = "--prewarm-lock-mode"

    result.stderr.fnmatch_lines(
        [
            f"ERROR: prewarm: lock mode 'bogus' from {source} is not one of auto, flock, "
            "lease; for example --prewarm-lock-mode=auto"
        ]
    )


def test_a_valid_stale_window_below_the_timeout_is_accepted_and_shown(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")

    result = pytester.runpytest(
        "-p",
        "no:hypothesispytest",
        "-v",  # the settings line is in the header under -v (no template is used)
        "--prewarm-lock-mode=lease",
        "--prewarm-stale-after=4",
        "--prewarm-timeout=5",
    )

    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(
        ["prewarm: * lock mode lease (requested), timeout 5 s, stale window 4 s"]
    )


# -- alive: never reclaimed by age -----------------------------------------------------------


@pytest.mark.parametrize("heartbeat", ["beating", "stopped"])
def test_a_live_holder_is_never_reclaimed_however_old_its_heartbeat(arena, heartbeat):
    quick = {"mode": "lease", "stale_after": 0.5, "heartbeat": 0.1}
    holder = arena.start("holder", block="before", **quick)
    arena.wait_flag("blocked-holder")
    if heartbeat == "stopped":
        stop(holder.pid)  # alive (state T), but its heartbeat thread stands still
    arena.start("waiter", timeout=2.5, **quick)

    waiter = arena.result("waiter")

    assert not waiter["ok"]
    assert waiter["error_type"] == "PrewarmTimeout"
    state = "stopped" if heartbeat == "stopped" else "running"  # SIGSTOP shows as such
    assert f"held by holder, pid {holder.pid} on this host, alive, {state}" in waiter["error"]
    assert f"alive, {state}" in arena.flag("waiting-waiter").read_text()
    assert events(waiter, "built") == []
    assert len(events(waiter, "timeout")) == 1
    # The holder still holds its lease: it finishes and publishes.
    if heartbeat == "stopped":
        os.kill(holder.pid, signal.SIGCONT)
    arena.release("holder")
    done = arena.result("holder")
    assert done["ok"], done
    assert done["origin"] == "built"
    assert [b["worker"] for b in arena.builds()] == ["holder"]
    assert arena.lease_files() == {"claim.1", "claim.1.released"}


# -- another pid namespace, same hostname ----------------------------------------------------


def test_a_live_holder_in_another_pid_namespace_is_never_reclaimed_in_lease_mode(arena):
    wrap = require_unshare("--pid", "--fork", "--mount-proc", "--kill-child")
    arena.start("holder", wrap=tuple(wrap), mode="lease", block="before", heartbeat=0.2)
    arena.wait_flag("blocked-holder")
    arena.start("waiter", mode="lease", stale_after=2.0, heartbeat=0.2, timeout=5.0)

    waiter = arena.result("waiter")

    # From out here its pid means nothing (unknown), but its heartbeat keeps moving.
    assert not waiter["ok"]
    assert waiter["error_type"] == "PrewarmTimeout"
    assert "unknown, it runs in another pid namespace" in waiter["error"]
    assert "held by holder, pid 1 on this host" in waiter["error"]
    assert events(waiter, "built") == []
    arena.release("holder")
    holder = arena.result("holder")
    assert holder["ok"], holder
    assert holder["origin"] == "built"
    assert [b["worker"] for b in arena.builds()] == ["holder"]
    assert overlaps(read_log(arena.log)) == []
    assert arena.lease_files() == {"claim.1", "claim.1.released"}


def test_a_holder_in_another_pid_namespace_excludes_by_flock_and_is_waited_for(arena):
    wrap = require_unshare("--pid", "--fork", "--mount-proc", "--kill-child")
    arena.start("holder", wrap=tuple(wrap), mode="flock", block="before")
    arena.wait_flag("blocked-holder")
    arena.start("waiter", mode="flock")
    waiting = arena.wait_flag("waiting-waiter").read_text()
    assert "held by holder, pid 1 on this host, unknown, it runs in another pid namespace" in (
        waiting
    )

    arena.release("holder")
    waiter = arena.result("waiter")

    assert waiter["ok"], waiter
    assert waiter["origin"] == "waited"
    assert waiter["value"]["by"] == "holder"
    assert [b["worker"] for b in arena.builds()] == ["holder"]
    assert overlaps(read_log(arena.log)) == []


def test_a_dead_holder_in_another_pid_namespace_is_reclaimed_only_after_the_stale_window(
    arena,
):
    wrap = require_unshare("--pid", "--fork", "--mount-proc", "--kill-child")
    holder = arena.start("holder", wrap=tuple(wrap), mode="lease", block="before", heartbeat=0.1)
    arena.wait_flag("blocked-holder")
    arena.kill("holder")  # unshare, and with it (--kill-child) the holder: pid 1 inside
    holder.popen.wait(timeout=30)
    arena.start("waiter", mode="lease", stale_after=1.0, heartbeat=0.2, timeout=30.0)

    waiter = arena.result("waiter")

    assert waiter["ok"], waiter
    (built,) = events(waiter, "built")
    # Its death cannot be proven from out here: "unknown", reclaimed by heartbeat age only.
    assert built["recovered_from"].startswith(
        "holder, pid 1: unknown, it runs in another pid namespace; heartbeat still for "
    )
    assert built["wait_seconds"] >= 1.0
    assert arena.lease_files() == {"claim.1", "claim.2", "claim.2.released"}


# -- another UTS namespace: another hostname ---------------------------------------------


def test_a_holder_on_another_host_whose_heartbeat_continues_is_never_reclaimed(arena):
    wrap = require_unshare("--uts")
    arena.start(
        "holder",
        wrap=tuple(wrap),
        hostname=OTHER_HOST,
        mode="lease",
        block="before",
        heartbeat=0.2,
    )
    arena.wait_flag("blocked-holder")
    arena.start("waiter", mode="lease", stale_after=2.0, heartbeat=0.2, timeout=5.0)

    waiter = arena.result("waiter")

    assert not waiter["ok"]
    assert waiter["error_type"] == "PrewarmTimeout"
    assert (
        f"held by holder, pid {arena.procs['holder'].pid} on host {OTHER_HOST}, "
        f"unknown, it ran on another host ({OTHER_HOST})"
    ) in waiter["error"]
    arena.release("holder")
    holder = arena.result("holder")
    assert holder["ok"], holder
    assert [b["worker"] for b in arena.builds()] == ["holder"]
    assert arena.lease_files() == {"claim.1", "claim.1.released"}


@pytest.mark.parametrize("stalled", ["before", "after"], ids=["mid-build", "after-build"])
def test_a_holder_on_another_host_whose_heartbeat_stops_is_reclaimed_and_may_not_publish(
    arena, stalled
):
    wrap = require_unshare("--uts")
    holder = arena.start(
        "holder",
        wrap=tuple(wrap),
        hostname=OTHER_HOST,
        mode="lease",
        block=stalled,
        heartbeat=0.1,
    )
    arena.wait_flag("blocked-holder")
    stop(holder.pid)  # its heartbeat stops; from here it is "unknown": another host
    arena.start("waiter", mode="lease", stale_after=1.0, heartbeat=0.2, block="before")
    arena.wait_flag("blocked-waiter")

    # The stale holder wakes up while its successor builds. Its release must not touch
    # the successor's claim, and it must not publish.
    arena.release("holder")
    os.kill(holder.pid, signal.SIGCONT)
    old = arena.result("holder")
    lease = arena.lease_dir()
    assert (lease / "claim.2").exists()
    assert not (lease / "claim.2.released").exists()
    assert json.loads((lease / "claim.2").read_text())["worker"] == "waiter"
    arena.release("waiter")
    new = arena.result("waiter")
    arena.start("late", mode="lease")
    late = arena.result("late")

    assert new["ok"], new
    assert new["origin"] == "built"
    (built,) = events(new, "built")
    assert built["recovered_from"].startswith(
        f"holder, pid {holder.pid}: unknown, it ran on another host ({OTHER_HOST}); "
        "heartbeat still for "
    )
    assert built["wait_seconds"] >= 1.0
    assert not old["ok"]
    assert old["error_type"] == "PrewarmLockError", old
    assert (
        "lost the lease while building (generation 2 was claimed while we held 1)" in (old["error"])
    )
    assert events(old, "built") == []
    # Nothing of the stale holder's survives: no template of its, and no failure record
    # that would fail the rest of the run.
    assert late["ok"], late
    assert late["value"] == new["value"]
    assert list((arena.lock_dir / "failures").rglob("*.json")) == []
    assert {"claim.1.released", "claim.2", "claim.2.released"} <= arena.lease_files()


# -- several reclaimers at once ---------------------------------------------------------------


def test_four_processes_reclaiming_one_dead_lease_at_once_end_with_one_builder(arena):
    arena.start("holder", mode="lease", block="before")
    arena.wait_flag("blocked-holder")
    holder_pid = arena.kill("holder")  # a zombie: provably dead to all four
    reclaimers = [f"r{i}" for i in range(4)]
    for name in reclaimers:
        arena.start(name, mode="lease", barrier=True)
    for name in reclaimers:
        arena.wait_flag(f"ready-{name}")
    arena.flag("go").touch()

    results = {name: arena.result(name) for name in reclaimers}

    assert all(r["ok"] for r in results.values()), results
    builders = [name for name, r in results.items() if r["origin"] == "built"]
    assert len(builders) == 1, results
    (builder,) = builders
    assert {r["origin"] for n, r in results.items() if n != builder} <= {"waited", "reused"}
    assert {json.dumps(r["value"]) for r in results.values()} == {
        json.dumps({"by": builder, "pid": arena.procs[builder].pid})
    }
    (built,) = events(results[builder], "built")
    assert built["recovered_from"] == f"holder, pid {holder_pid}: dead, zombie"
    assert [b["worker"] for b in arena.builds()] == ["holder", builder]
    assert overlaps(read_log(arena.log)) == []
    # The reclaim winner holds generation 2, the claim it won; whatever generations came
    # after (a loser may claim and release at once, seeing the template published), every
    # one of them was released. A holder of generation g removes generations below g - 1
    # (they can never be the top again), so the top two generations are always there.
    files = arena.lease_files()
    top = max(int(name.split(".")[1]) for name in files)
    assert top >= 2
    kept = {int(name.split(".")[1]) for name in files if name.count(".") == 1}
    assert {max(top - 1, 2), top} <= kept
    assert {f"claim.{gen}.released" for gen in kept if gen >= 2} <= files
    if 2 in kept:
        claim_2 = json.loads((arena.lease_dir() / "claim.2").read_text())
        assert claim_2["worker"] == builder


# -- one lease driven in this process ---------------------------------------------------------


def in_process_lease(tmp_path: Path, heartbeat: float = 10.0) -> LeaseLock:
    return LeaseLock(tmp_path / "db.lease", "db", stale_after=60.0, heartbeat=heartbeat)


def test_generations_older_than_the_one_before_ours_are_removed_as_we_take_the_lease(tmp_path):
    lease = in_process_lease(tmp_path)
    for _ in range(4):
        assert lease.try_acquire(own_record("gw0", "run")) is not None
        lease.release()

    assert sorted(os.listdir(tmp_path / "db.lease")) == [
        "claim.3",
        "claim.3.released",
        "claim.4",
        "claim.4.released",
    ]


def test_a_lease_never_taken_is_not_held(tmp_path):
    lease = in_process_lease(tmp_path)

    assert lease.lost() == "not held"
    with pytest.raises(PrewarmLockError, match=r"lost the lease while building \(not held\)"):
        lease.confirm_held("discarded")


def test_a_claim_that_disappears_under_its_holder_is_a_lost_lease(tmp_path):
    lease = in_process_lease(tmp_path, heartbeat=0.01)
    assert lease.try_acquire(own_record("gw0", "run")) is not None
    try:
        claim = tmp_path / "db.lease" / "claim.1"
        claim.unlink()  # a careless cleanup of the lock dir while the build runs

        wait_until(lease.lost, 30.0, "the heartbeat to notice")

        assert lease.lost() == f"our claim {claim} disappeared"
    finally:
        lease.release()


@pytest.mark.parametrize("planted", ["fifo", "torn record"])
def test_a_top_claim_that_is_no_record_names_what_is_there(tmp_path, planted):
    lease_dir = tmp_path / "db.lease"
    lease_dir.mkdir(mode=0o700)
    claim = lease_dir / "claim.1"
    if planted == "fifo":
        os.mkfifo(claim)
    else:
        claim.write_text('{"pid": 4')

    holder = in_process_lease(tmp_path).holder()

    assert holder.record is None
    expected = (
        f"the owner record {claim} is a FIFO, not a record"
        if planted == "fifo"
        else "no readable owner record (torn, oversized or not one of ours)"
    )
    assert holder.verdict == Verdict(Liveness.UNKNOWN, expected)
