"""filelock's soft leases and strict soft locks against the plugin's promise about holders.

The plugin promises: a dead holder is reclaimed at once, a provably alive holder is never
robbed however long it holds, and a holder of unknown liveness (another host, another pid
namespace) is reclaimed only after its heartbeat stood still for the stale window. Each
test here runs a real holder process under one of filelock's soft locks, puts it in a
state the plugin has an answer for (stopped, starved of the GIL, zombie, dead, on another
machine with this hostname, paused inside its release), and shows what a second filelock
user does next, next to what the plugin's liveness check says about the same holder.

Why that means lease mode is not built on filelock: docs/filelock-leases.md. The plugin's
own lease mode under the same conditions is exercised in test_lease.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _workers import proc_state

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the holders' states are read from Linux /proc"
)

filelock = pytest.importorskip("filelock")
if not all(hasattr(filelock, name) for name in ("SoftFileLease", "StrictSoftFileLock")):
    pytest.skip(
        f"filelock {filelock.__version__} has no SoftFileLease/StrictSoftFileLock (4.2+ has)",
        allow_module_level=True,
    )


def plugin_side() -> SimpleNamespace:
    """The plugin's liveness check: the only place in this file that names plugin modules.

    - ``judge(record_json)``: the plugin's verdict on the holder a JSON owner record names;
    - ``DEAD``, ``ALIVE``, ``UNKNOWN``: the verdict states;
    - ``own_record_json()``: the calling process's owner record, as JSON;
    - ``moved_elsewhere(record_json, pid)``: the same record as a process ``pid`` on another
      machine with this hostname would write it (another boot id);
    - ``SOURCE``: Python source defining ``own_record_json()`` for a holder subprocess.
    """
    from pytest_prewarm.liveness import Liveness, classify, own_record
    from pytest_prewarm.owner import parse_record

    source = (
        "def own_record_json():\n"
        "    from pytest_prewarm.liveness import own_record\n"
        "    return own_record('holder', 'filelock-peers').to_json()\n"
    )

    def judge(record_json: str) -> Any:
        record = parse_record(record_json)
        assert record is not None, f"the plugin cannot read its own record {record_json!r}"
        return classify(record)

    def moved_elsewhere(record_json: str, pid: int) -> str:
        record = parse_record(record_json)
        assert record is not None
        return record._replace(pid=pid, boot_id=secrets.token_hex(16)).to_json()

    return SimpleNamespace(
        judge=judge,
        DEAD=Liveness.DEAD,
        ALIVE=Liveness.ALIVE,
        UNKNOWN=Liveness.UNKNOWN,
        own_record_json=lambda: own_record("test", "filelock-peers").to_json(),
        moved_elsewhere=moved_elsewhere,
        SOURCE=source,
    )


SHORT_LEASE = 0.3  # seconds: expiry is what tests (a) wait for, so keep it short
LONG_LEASE = 30.0  # seconds: far beyond any wait here, so no takeover can be by age
MISS = 0.4  # seconds a contender tries before a Timeout counts as "not reclaimed"

# One holder program for every test. argv: kind, lease duration, lock path, record path,
# what to do once it holds. It writes its plugin owner record (atomically) once it holds:
# that file existing is the "ready" signal.
HOLDER = """
import itertools, os, sys, threading, time
from pathlib import Path

import filelock

{plugin_source}

kind, duration, lock_path, record_path, then = sys.argv[1:6]
if kind == "lease":
    duration = float(duration)
    lock = filelock.SoftFileLease(
        lock_path, lease_duration=duration, heartbeat_interval=duration / 10
    )
elif kind == "soft":
    lock = filelock.SoftFileLock(lock_path)
else:
    lock = filelock.StrictSoftFileLock(lock_path)
lock.acquire(timeout=10)
Path(record_path + ".tmp").write_text(own_record_json())
os.replace(record_path + ".tmp", record_path)
if then == "hog":
    # One C call that never lets go of the GIL, as a long GC pass or a C extension can:
    # the process runs, and its heartbeat thread cannot.
    sum(itertools.repeat(1, 10**14))
elif then == "release-when-asked":
    asked = Path(record_path + ".release")
    deadline = time.monotonic() + 60
    while not asked.exists():
        if time.monotonic() > deadline:
            sys.exit("nobody asked for the release")
        time.sleep(0.002)
    lock.release()
    Path(record_path + ".released").write_text(repr(lock.compromise))
else:
    threading.Event().wait(120)  # hold until killed
"""


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll an observable state with a deadline (the pause only keeps the poll off a core)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.002)
    return result


def lease(path: Path, duration: float) -> Any:
    return filelock.SoftFileLease(
        str(path), lease_duration=duration, heartbeat_interval=duration / 10
    )


def contender(kind: str, path: Path, duration: float) -> Any:
    if kind == "lease":
        return lease(path, duration)
    if kind == "soft":
        return filelock.SoftFileLock(str(path))
    return filelock.StrictSoftFileLock(str(path))


def acquired_within(lock: Any, timeout: float) -> float | None:
    """Seconds ``lock.acquire`` took, or None if it timed out after ``timeout`` s."""
    started = time.monotonic()
    try:
        lock.acquire(timeout=timeout, poll_interval=0.01)
    except filelock.Timeout:
        return None
    return time.monotonic() - started


@pytest.fixture
def plugin() -> SimpleNamespace:
    return plugin_side()


@dataclass
class Holder:
    """A holder process, its lock file, and the plugin owner record it wrote once it held."""

    proc: Any  # conftest's Proc: .pid, .popen, .kill(), .wait(), .output()
    lock_path: Path
    record_path: Path

    @property
    def record(self) -> str:
        return self.record_path.read_text()


@pytest.fixture
def start_holder(tmp_path: Path, processes: Any, plugin: SimpleNamespace) -> Callable[..., Holder]:
    """``start_holder(kind, duration, then)``: a process holding a filelock soft lock.

    It is spawned through the ``processes`` fixture, which SIGKILLs it (if need be) and
    reaps it at teardown, stopped, starved or zombie alike.
    """
    code = HOLDER.format(plugin_source=plugin.SOURCE)

    def start(
        kind: str,
        duration: float,
        then: str,
        *,
        name: str = "holder",
        wrap: tuple[str, ...] = (),
        lock_path: Path | None = None,
    ) -> Holder:
        lock_path = lock_path or tmp_path / f"{kind}.lock"
        record_path = tmp_path / f"{name}.json"
        argv = [*wrap, sys.executable, "-c", code, kind, str(duration)]
        proc = processes.spawn([*argv, str(lock_path), str(record_path), then])

        def ready() -> bool:
            if proc.popen.poll() is not None:
                pytest.fail(f"{name} exited with {proc.popen.returncode}:\n{proc.output()}")
            return record_path.exists()

        wait_until(ready, f"{name} to hold its {kind} lock")
        return Holder(proc, lock_path, record_path)

    return start


def release_quietly(*locks: Any) -> None:
    for lock in locks:
        with contextlib.suppress(Exception):
            lock.release(force=True)


# -- (a) a live holder whose heartbeat stopped ---------------------------------------------


@pytest.mark.parametrize("pause", ["sigstop", "gil"])
def test_filelock_takes_an_expired_lease_from_a_live_holder_the_plugin_calls_alive(
    start_holder, plugin, pause
):
    """SoftFileLease expires by age alone: a stopped or GIL-starved live holder is robbed."""
    if pause == "gil" and not getattr(sys, "_is_gil_enabled", lambda: True)():
        pytest.skip("no GIL in this interpreter: a busy thread cannot starve the heartbeat")
    holder = start_holder("lease", SHORT_LEASE, "hog" if pause == "gil" else "")
    pid = holder.proc.pid
    if pause == "sigstop":
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: proc_state(pid) == "T", f"pid {pid} to stop")
    peer = lease(holder.lock_path, SHORT_LEASE)
    try:
        took = acquired_within(peer, timeout=10 * SHORT_LEASE)

        assert took is not None, "filelock never took the lease"
        assert took >= SHORT_LEASE  # by expiry of an unchanged marker, not by a death
        assert peer.is_locked
        # ... while the holder lives on: stopped (T) or running its own code (R).
        assert proc_state(pid) == ("T" if pause == "sigstop" else "R")
        verdict = plugin.judge(holder.record)
        assert verdict.state is plugin.ALIVE, verdict  # so the plugin would keep waiting
    finally:
        release_quietly(peer)
        if pause == "sigstop":
            os.kill(pid, signal.SIGCONT)
    assert holder.proc.popen.poll() is None  # it never died: it was robbed while alive


# -- (b) a zombie holder: dead to the plugin at once --------------------------------------


@pytest.mark.parametrize("kind", ["lease", "soft"])
def test_a_zombie_holder_is_dead_to_the_plugin_but_holds_a_filelock_soft_lock(
    start_holder, plugin, kind
):
    """A killed, unreaped holder (as xdist leaves a worker) keeps filelock's soft locks.

    filelock's kill(pid, 0) and start token both say "alive" for a zombie: SoftFileLock
    waits for ever, SoftFileLease until its lease runs out. Only reaping frees it at once.
    """
    holder = start_holder(kind, LONG_LEASE, "")
    pid = holder.proc.pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: proc_state(pid) == "Z", f"pid {pid} to be a zombie")

    verdict = plugin.judge(holder.record)
    assert verdict.state is plugin.DEAD, verdict
    assert "zombie" in verdict.reason
    peer = contender(kind, holder.lock_path, LONG_LEASE)
    try:
        assert acquired_within(peer, timeout=MISS) is None  # not reclaimed: a zombie is "alive"

        holder.proc.popen.wait(timeout=30)  # reaped: now even filelock sees it gone
        assert plugin.judge(holder.record).state is plugin.DEAD
        took = acquired_within(peer, timeout=5.0)
        assert took is not None, "filelock did not reclaim a reaped holder either"
        assert took < LONG_LEASE  # by its death, not by age
    finally:
        release_quietly(peer)


def test_a_dead_holder_of_a_strict_soft_lock_is_never_reclaimed(start_holder, plugin):
    """StrictSoftFileLock never judges liveness: a SIGKILLed, reaped holder keeps it."""
    holder = start_holder("strict", LONG_LEASE, "")
    holder.proc.kill()  # SIGKILL and reap: no such process any more

    verdict = plugin.judge(holder.record)
    assert verdict.state is plugin.DEAD, verdict
    assert verdict.reason == "no such process"
    peer = contender("strict", holder.lock_path, LONG_LEASE)
    try:
        assert acquired_within(peer, timeout=MISS) is None
        # The claim names the dead process; only force_break() would remove it.
        claims = peer.claims
        assert {claim.pid for claim in claims} == {holder.proc.pid}
        assert "held" in {claim.state for claim in claims}
    finally:
        release_quietly(peer)


# -- (c) a live holder on another machine that has this hostname ---------------------------


def lease_marker(pid: int, hostname: str, start: int, duration: float) -> tuple[str, Any]:
    """A SoftFileLease marker as filelock writes it, and the record filelock must read back."""
    token = secrets.token_hex(16)
    text = "".join(
        f"{line}\n"
        for line in (
            "filelock/2",
            f"pid={pid}",
            f"host={hostname}",
            "mode=lease",
            f"token={token}",
            f"duration={duration!r}",
            f"start={start}",
        )
    )
    expected = filelock.OwnerRecord(
        pid=pid, hostname=hostname, mode="lease", token=token, lease_duration=duration, start=start
    )
    return text, expected


@pytest.mark.parametrize("pid_here", ["unused", "another-process"])
def test_a_holder_on_another_machine_with_this_hostname_is_robbed_at_once(
    tmp_path, processes, plugin, pid_here
):
    """filelock reads another boot id in a start token as "this host rebooted": holder dead.

    Hostnames are not unique across machines (CI runners, containers on two hosts sharing
    an NFS lock dir). We cannot run a second machine, so the test writes the marker such a
    holder writes there: its pid, this hostname, its start token (its own boot id in the
    high bits), a fresh mtime and a 30 s lease. The plugin calls that holder unknown.
    """
    if pid_here == "unused":
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid = gone.pid
    else:
        pid = processes.spawn(["sleep", "60"]).pid  # that pid means another process here
    remote_boot = secrets.randbits(127) | 1 << 126
    marker, expected = lease_marker(pid, socket.gethostname(), remote_boot << 64 | 4242, LONG_LEASE)
    lock_path = tmp_path / "shared.lock"
    lock_path.write_text(marker)
    peer = lease(lock_path, LONG_LEASE)
    assert peer.owner == expected  # filelock reads the marker as its own kind
    try:
        took = acquired_within(peer, timeout=5.0)

        assert took is not None, "filelock respected the remote holder"
        assert took < 1.0  # judged dead on sight; its 30 s lease had just begun
        remote = plugin.moved_elsewhere(plugin.own_record_json(), pid)
        verdict = plugin.judge(remote)
        assert verdict.state is plugin.UNKNOWN, verdict  # only a stopped heartbeat may free it
    finally:
        release_quietly(peer)


# -- (d) release by name: a paused release deletes the next holder's marker ------------------


def strace_delaying_unlink(seconds: float) -> tuple[str, ...]:
    """strace argv that pauses each unlink of the traced process for ``seconds``."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace(1) is not installed: it pauses the holder between check and unlink")
    delay = f"inject=unlink,unlinkat:delay_enter={int(seconds * 1e6)}"
    for seccomp in (("--seccomp-bpf",), ()):
        argv = (strace, "-f", *seccomp, "-qq", "-o", os.devnull, "-e", "trace=unlink,unlinkat")
        argv += ("-e", delay)
        probe = subprocess.run(
            [*argv, "true"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return argv
    pytest.skip(f"strace cannot trace here (ptrace refused?): {probe.stderr.strip()}")


def test_a_release_paused_before_its_unlink_deletes_the_next_holders_lease(start_holder, plugin):
    """filelock releases a lease by checking that the marker is its own, then unlinking it.

    A holder paused between the two (here by strace; a SIGSTOP or a stall on a slow
    filesystem at that point does the same) sees its lease expire meanwhile. A contender
    takes the lease, the release then deletes the contender's marker, and a third process
    acquires while the second still holds; the second hears of it only afterwards, from its
    heartbeat. The plugin's release never deletes the current claim, and a live holder's
    claim never expires.
    """
    # The contender must take the expired lease while the release is paused: a pause of
    # six lease durations leaves room for a loaded machine (1.5 s was missed once, in a
    # full run with helpers' runs on the same two cores).
    duration, pause = 0.5, 3.0
    wrap = strace_delaying_unlink(pause)
    first = start_holder("lease", duration, "release-when-asked", name="first", wrap=wrap)
    released = Path(f"{first.record_path}.released")
    second = lease(first.lock_path, duration)
    try:
        Path(f"{first.record_path}.release").touch()  # it checks its marker, then stalls
        took = acquired_within(second, timeout=pause - 0.2)
        assert took is not None, "the contender did not take the expired lease in time"
        assert not released.exists()  # taken while the release waited to unlink
        verdict = plugin.judge(first.record)
        assert verdict.state is plugin.ALIVE, verdict  # the plugin would not have let it in

        wait_until(released.exists, "the paused holder to finish its release")
        assert released.read_text() == "None"  # the releaser noticed nothing
        assert not os.path.lexists(first.lock_path)  # ... but deleted the contender's marker

        # A third process now takes the lease at once, while the second still holds it.
        start_holder("lease", duration, "", name="third", lock_path=first.lock_path)
        assert second.is_locked
    finally:
        release_quietly(second)
    first.proc.wait(timeout=30)
