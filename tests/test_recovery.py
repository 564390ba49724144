"""A holder that dies mid-build is taken over at once, in flock and lease mode alike.

Real processes run tests/_workers.py (a TemplateStore competitor); the dead holder is a
real SIGKILLed process, usually kept as an unreaped zombie of this test, as pytest-xdist
keeps a crashed worker. Also here: which lock mode ``auto`` picks for the lock dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _workers import Arena, overlaps, read_log

from pytest_prewarm.lockdir import choose_lock_mode, filesystem_type

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="liveness proofs come from Linux /proc"
)

UNSHARE = shutil.which("unshare")
MODES = ["flock", "lease"]


@pytest.fixture
def arena(tmp_path: Path, processes) -> Arena:
    return Arena(tmp_path / "arena", processes)


def built_event(result: dict) -> dict:
    (event,) = [e for e in result["events"] if e["outcome"] == "built"]
    return event


# -- a dead holder, seen by a waiting process ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_holder_killed_mid_build_is_taken_over_by_the_waiter_who_names_it_dead(arena, mode):
    # A stale window of 30 s: a takeover well under it was decided by proof, not by age.
    lease = {"mode": mode, "stale_after": 30.0, "heartbeat": 0.2}
    arena.start("holder", block="after", **lease)  # writes its files, then hangs
    arena.wait_flag("blocked-holder")
    arena.start("waiter", **lease)
    waiting = arena.wait_flag("waiting-waiter").read_text()
    holder_pid = arena.procs["holder"].pid
    assert f"held by holder, pid {holder_pid} on this host, alive, running" in waiting

    arena.kill("holder")  # and keep it as an unreaped zombie, as pytest-xdist does
    killed_at = time.monotonic()
    result = arena.result("waiter")
    taken_over_in = time.monotonic() - killed_at

    assert result["ok"], result
    assert result["origin"] == "built"
    assert result["value"] == {"by": "waiter", "pid": arena.procs["waiter"].pid}
    assert result["files"] == 20
    # The waiter may look while the holder is still exiting or once it is a zombie;
    # either way it must say "dead", with its reason.
    assert built_event(result)["recovered_from"].startswith(f"holder, pid {holder_pid}: dead, ")
    assert taken_over_in < 10, f"took {taken_over_in:.1f} s: by age, not by proof?"
    # The rebuild started from a clean staging dir; the dead holder's was moved aside.
    dead, rebuilt = arena.builds()
    assert (dead["worker"], rebuilt["worker"]) == ("holder", "waiter")
    assert rebuilt["empty"] is True
    assert rebuilt["siblings"] == [Path(rebuilt["path"]).parent.name]
    assert overlaps(read_log(arena.log)) == []


@pytest.mark.parametrize(
    ("fate", "reason"),
    [
        pytest.param("zombie", "zombie", id="zombie"),
        pytest.param("reaped", "no such process", id="reaped"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_the_next_process_names_how_the_dead_holder_died_and_a_later_one_reuses_its_build(
    arena, mode, fate, reason
):
    arena.start("holder", mode=mode, block="before", stale_after=30.0)
    arena.wait_flag("blocked-holder")
    holder_pid = arena.kill("holder")
    if fate == "reaped":
        arena.procs["holder"].popen.wait(timeout=30)
    arena.start("second", mode=mode, stale_after=30.0)
    second = arena.result("second")
    arena.start("third", mode=mode)

    third = arena.result("third")

    assert second["ok"], second
    assert second["origin"] == "built"
    assert built_event(second)["recovered_from"] == f"holder, pid {holder_pid}: dead, {reason}"
    assert third["ok"], third
    assert third["origin"] == "reused"
    assert third["value"] == second["value"]
    assert [b["worker"] for b in arena.builds()] == ["holder", "second"]
    if mode == "lease":
        # Reclaiming added generation 2; nothing was removed to reclaim.
        assert arena.lease_files() == {"claim.1", "claim.2", "claim.2.released"}
        claim_1 = json.loads((arena.lease_dir() / "claim.1").read_text())
        claim_2 = json.loads((arena.lease_dir() / "claim.2").read_text())
        assert (claim_1["pid"], claim_2["pid"]) == (holder_pid, arena.procs["second"].pid)


# -- a real pytest-xdist run whose builder worker SIGKILLs itself ----------------------------

XDIST_CONFTEST = """
    import json
    import os
    import signal
    import time

    import pytest

    import prewarm_probe as probe


    def build(path):
        attempt = probe.count_attempt(path, t=time.monotonic())
        probe.wait_for_requests(4)  # every worker is asking: three of them are waiting
        if attempt == 1:
            probe.write_files(path, 10)
            killed = {"worker": probe.worker(), "pid": os.getpid(), "t": time.monotonic()}
            (probe.HERE / "killed.json").write_text(json.dumps(killed))
            os.kill(os.getpid(), signal.SIGKILL)
        probe.write_files(path, 20)
        return {"attempt": attempt}


    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        probe.announce_request()
        return prewarmed_template("db", build)
"""

XDIST_TESTS = """
    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(8))
    def test_sees_a_complete_template(db, i):
        probe.record("seen", files=probe.check_complete(db), value=db.value)
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_builder_worker_that_sigkills_itself_is_replaced_within_a_second(suite, mode):
    suite.write(conftest=XDIST_CONFTEST, test_db=XDIST_TESTS)

    result = suite.run(
        "-n",
        "4",
        "--max-worker-restart=2",
        "--prewarm-lock-mode",
        mode,
        "--prewarm-timeout=60",  # stale window: 30 s
    )

    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines([f"prewarm: lock dir * lock mode {mode} (requested)*"])
    killed = json.loads((suite.path / "killed.json").read_text())
    first, second = suite.attempts()
    assert first["pid"] == killed["pid"]
    assert second["worker"] != killed["worker"]
    # xdist keeps the crashed worker as a zombie: proof of death, so no stale window.
    # (A waiter may also catch it still exiting; the proof is the same.)
    result.stdout.fnmatch_lines(
        [f"*gw? reclaimed the lock from {killed['worker']}, pid {killed['pid']}: dead, *"]
    )
    assert second["t"] - killed["t"] < 3.0, "the takeover waited for something other than proof"
    seen = suite.records("seen")
    assert len(seen) == 7
    assert {r["value"]["attempt"] for r in seen} == {2}
    assert all(len(r["files"]) == 20 for r in seen)


# -- auto mode -----------------------------------------------------------------------------


def test_auto_mode_picks_flock_on_a_local_filesystem_and_says_why(tmp_path):
    fstype = filesystem_type(tmp_path)
    expected = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    mode, why = choose_lock_mode(tmp_path, "auto")

    assert fstype == expected
    assert (mode, why) == ("flock", f"auto: {fstype} filesystem supports flock")


@pytest.mark.parametrize("requested", ["flock", "lease"])
def test_an_explicit_lock_mode_is_used_as_requested(tmp_path, requested):
    assert choose_lock_mode(tmp_path, requested) == (requested, "requested")


# Runs in a private mount namespace: mounts tmpfs (under a name with a space, which
# mountinfo escapes as \040) inside tmp_path and reports what the lock dir code detects.
MOUNT_SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from pytest_prewarm.lockdir import choose_lock_mode, filesystem_type

base = Path(sys.argv[1])
mnt = base / "mount point"
mnt.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "prewarm-test", str(mnt)], check=True)
(mnt / "locks").mkdir()
print(json.dumps({
    "mount": filesystem_type(mnt),
    "inside": filesystem_type(mnt / "locks"),
    "beside": filesystem_type(base),
    "prefix_twin": filesystem_type(base / "mount point2"),
    "choice": choose_lock_mode(mnt / "locks", "auto"),
}))
"""


def test_the_filesystem_type_comes_from_the_longest_matching_mount(tmp_path, processes):
    if UNSHARE is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root to mount tmpfs in a private mount namespace")
    outside = filesystem_type(tmp_path)
    proc = processes.spawn(
        [UNSHARE, "--mount", sys.executable, "-c", textwrap.dedent(MOUNT_SCRIPT), str(tmp_path)]
    )
    assert proc.wait(timeout=60) == 0, proc.output()

    got = json.loads(proc.output().strip().splitlines()[-1])

    assert got["mount"] == "tmpfs"
    assert got["inside"] == "tmpfs"
    assert got["beside"] == outside != "tmpfs"
    assert got["prefix_twin"] == outside  # "mount point2" is not under "mount point"
    assert got["choice"] == ["flock", "auto: tmpfs filesystem supports flock"]
    # The mount stayed private to the namespace.
    assert filesystem_type(tmp_path / "mount point") == outside
    assert list((tmp_path / "mount point").iterdir()) == []


def test_the_lock_mode_and_its_reason_are_in_the_summary(pytester):
    # The line is in the summary of a run that uses a template (the header shows it under -v)
    pytester.makepyfile(
        "def test_uses(prewarmed_template):\n    prewarmed_template('db', lambda path: None)\n"
    )

    # (hypothesis's plugin would import hypothesis for its summary: seconds, for nothing)
    auto = pytester.runpytest("-p", "no:hypothesispytest", "--prewarm-lock-dir", "locks")
    lease = pytester.runpytest("-p", "no:hypothesispytest", "--prewarm-lock-mode", "LEASE")

    fstype = filesystem_type(pytester.path)
    auto.stdout.fnmatch_lines(
        [f"prewarm: lock dir * lock mode flock (auto: {fstype} filesystem supports flock)*"]
    )
    lease.stdout.fnmatch_lines(["prewarm: lock dir * lock mode lease (requested)*"])
    assert auto.ret == lease.ret == 0
