"""The liveness classifier against real processes: dead needs proof, everything else is not dead.

Every process a test starts goes through the ``procs`` fixture, which kills its whole process
group and reaps it at teardown. Waits poll a file or /proc with a bound; nothing sleeps to
synchronise. Scenarios that need another uid, pid namespace, UTS namespace or a private /proc run
a small Python script (the ``*_SCRIPT`` constants) in a child, which prints its findings as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _workers import proc_state
from conftest import let_other_users_save_coverage, linux_proc_only

from pytest_prewarm import liveness
from pytest_prewarm.liveness import HostIdentity, Liveness, Verdict
from pytest_prewarm.owner import MAX_PID, OwnerRecord, read_record

PY = sys.executable
SLEEP = shutil.which("sleep") or "/bin/sleep"
UNSHARE = shutil.which("unshare")
NOBODY = 65534  # owns the "other user's" processes
OTHER_UID = 65533  # the unprivileged observer; neither root nor nobody

DEAD, ALIVE, UNKNOWN = Liveness.DEAD, Liveness.ALIVE, Liveness.UNKNOWN

# Everything here reads /proc: start ticks, boot id, pid namespaces, hidepid.
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process identity comes from Linux /proc"
)


# --------------------------------------------------------------------------------------------
# Child-side scripts. Each imports what it needs *before* dropping privileges: the interpreter's
# stdlib may live under a directory the unprivileged uid cannot read.

_PRELUDE = r"""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path
import psutil
from pytest_prewarm import liveness
from pytest_prewarm.files import write_atomic
from pytest_prewarm.owner import OwnerRecord, parse_record

def record_for(pid, ticks, here, create_time=None):
    if create_time is None and ticks is not None:  # psutil's create_time on Linux
        create_time = ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
    return OwnerRecord(pid=pid, hostname=here.hostname, boot_id=here.boot_id,
                       pid_ns=here.pid_ns, start_ticks=ticks, create_time=create_time,
                       worker="child", run_id="run", started_at=0.0)

def own_record():
    pid, ticks, create_time = liveness.own_identity()
    return record_for(pid, ticks, liveness.local_host(), create_time)

def verdict(record):
    v = liveness.classify(record)
    return {"state": v.state.value, "reason": v.reason}

def probe(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "ESRCH"
    except PermissionError:
        return "EPERM"
    return "ok"

def drop_to(uid):
    verdict(own_record())  # warm up every lazy import while we can still read the stdlib
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)

def wait_for_state(pid, state, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == state:
                return
        time.sleep(0.001)
    raise SystemExit(f"pid {pid} never reached state {state}")
"""

# argv[1]: {"records": [record json text, ...], "uid": optional uid to drop to}
# prints {"uid", "here", "verdicts": [{"state", "reason", "kill"}]}
CLASSIFY_SCRIPT = (
    _PRELUDE
    + r"""
args = json.loads(sys.argv[1])
if args.get("uid") is not None:
    drop_to(args["uid"])
out = []
for text in args["records"]:
    record = parse_record(text)
    out.append({**verdict(record), "kill": probe(record.pid)})
print(json.dumps({"uid": os.getuid(), "here": liveness.local_host()._asdict(),
                  "verdicts": out}))
"""
)

# argv[1]: where to write our own owner record; argv[2] (optional): hostname to take first.
# Stays alive until stdin closes.
HOLD_SCRIPT = (
    _PRELUDE
    + r"""
if len(sys.argv) > 2:
    socket.sethostname(sys.argv[2])
write_atomic(Path(sys.argv[1]), own_record().to_json())
sys.stdin.read()
"""
)

# argv[1]: directory. Inside its own pid namespace: SIGKILL a child without reaping it, write its
# record to DIR/owner.json and the verdict from inside to DIR/inside.json, then wait for stdin EOF.
ZOMBIE_IN_NS_SCRIPT = (
    _PRELUDE
    + r"""
out = Path(sys.argv[1])
child = subprocess.Popen([sys.argv[2], "1000"])
record = record_for(child.pid, liveness.start_ticks(child.pid), liveness.local_host())
os.kill(child.pid, signal.SIGKILL)
wait_for_state(child.pid, "Z")
write_atomic(out / "inside.json", json.dumps({**verdict(record), "kill": probe(child.pid)}))
write_atomic(out / "owner.json", record.to_json())
sys.stdin.read()
"""
)

# Inside a fresh pid namespace with its own /proc: a real pid reuse, steered by ns_last_pid.
# argv[1]: sleep binary.
REUSE_SCRIPT = (
    _PRELUDE
    + r"""
here = liveness.local_host()
first = subprocess.Popen([sys.argv[1], "1000"])
record = record_for(first.pid, liveness.start_ticks(first.pid), here)
before = verdict(record)
first.kill()
first.wait()
after_exit = verdict(record)
# Let at least one clock tick pass, or the new process could share the recorded start tick.
hz = os.sysconf("SC_CLK_TCK")
deadline = time.monotonic() + 10
while time.clock_gettime(time.CLOCK_BOOTTIME) * hz < record.start_ticks + 2:
    if time.monotonic() > deadline:
        raise SystemExit("CLOCK_BOOTTIME did not advance")
    time.sleep(0.001)
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(first.pid - 1))
second = subprocess.Popen([sys.argv[1], "1000"])
reused = verdict(record)
print(json.dumps({"first": first.pid, "second": second.pid, "ticks": record.start_ticks,
                  "second_ticks": liveness.start_ticks(second.pid), "before": before,
                  "after_exit": after_exit, "reused": reused}))
second.kill()
second.wait()
"""
)

# Inside a pid namespace with a *private* /proc mounted hidepid=argv[1]: root starts a process of
# user nobody (and another that it kills and reaps), then drops to OTHER_UID and classifies both.
HIDEPID_SCRIPT = (
    _PRELUDE
    + r"""
mode, sleep, nobody, other = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
subprocess.run(["mount", "-t", "proc", "-o", f"hidepid={mode}", "proc", "/proc"], check=True)
here = liveness.local_host()
as_nobody = {"user": nobody, "group": nobody, "extra_groups": []}
live = subprocess.Popen([sleep, "1000"], **as_nobody)
gone = subprocess.Popen([sleep, "1000"], **as_nobody)
live_record = record_for(live.pid, liveness.start_ticks(live.pid), here)
gone_record = record_for(gone.pid, liveness.start_ticks(gone.pid), here)
gone.kill()
gone.wait()
drop_to(other)
print(json.dumps({
    "uid": os.getuid(),
    "mounts": [line for line in open("/proc/mounts") if line.split()[1] == "/proc"],
    "proc_dir_visible": os.path.exists(f"/proc/{live.pid}"),
    "psutil_pid_exists": psutil.pid_exists(live.pid),
    "kill": probe(live.pid),
    "live": verdict(live_record),
    "gone": verdict(gone_record),
}))
"""
)

# Inside a pid namespace that still sees the *parent's* /proc (``unshare --pid --fork`` without
# --mount-proc): report our pid, what /proc/self really is, and what own_identity() claims.
PARENT_PROC_IDENTITY_SCRIPT = (
    _PRELUDE
    + r"""
with open("/proc/self/stat") as f:
    true_ticks = int(f.read().rpartition(")")[2].split()[19])
print(json.dumps({"getpid": os.getpid(), "proc_self": int(os.readlink("/proc/self")),
                  "own_identity": liveness.own_identity(), "true_ticks": true_ticks}))
"""
)

# Same namespace set-up. argv[1]: a pid P that belongs to some process of the *parent* namespace.
# A holder is started so that its pid *inside* is also P (ns_last_pid), writes its own record,
# and is classified from inside while alive and after it exited.
PARENT_PROC_COLLISION_SCRIPT = (
    _PRELUDE
    + r"""
target = int(sys.argv[1])
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(target - 1))
code = ("import json, sys\nfrom pytest_prewarm import liveness\n"
        "print(json.dumps(liveness.own_identity()), flush=True)\nsys.stdin.read()")
holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
pid, ticks, create_time = json.loads(holder.stdout.readline())
record = record_for(pid, ticks, liveness.local_host(), create_time)
while_alive = verdict(record)
alive_check = probe(holder.pid)
holder.stdin.close()
holder.wait()
holder.stdout.close()
after_exit = verdict(record)
print(json.dumps({"holder_pid": pid, "recorded_ticks": ticks, "while_alive": while_alive,
                  "alive_check": alive_check, "after_exit": after_exit,
                  "exit_check": probe(pid)}))
"""
)


# --------------------------------------------------------------------------------------------
# Helpers and fixtures


def poll_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Bounded polling: check ``predicate`` until it holds, fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


def created_at(ticks: int | None) -> float | None:
    """psutil's create_time on Linux for a process started at ``ticks``: both start times
    of a record then name one process, so a test reads the same on either code path."""
    if ticks is None:
        return None
    return ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time()


def record_for(
    pid: int, ticks: int | None, here: HostIdentity | None = None, **overrides: Any
) -> OwnerRecord:
    here = here if here is not None else liveness.local_host()
    record = OwnerRecord(
        pid=pid,
        hostname=here.hostname,
        boot_id=here.boot_id,
        pid_ns=here.pid_ns,
        start_ticks=ticks,
        create_time=created_at(ticks),
        worker="gw0",
        run_id="run",
        started_at=0.0,
    )
    return record._replace(**overrides)


def own_record(**overrides: Any) -> OwnerRecord:
    pid, ticks, create_time = liveness.own_identity()
    return record_for(pid, ticks, create_time=create_time, **overrides)


class Procs:
    """Starts processes in their own session; at teardown kills each group and reaps it."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._procs: list[subprocess.Popen[Any]] = []

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        return proc

    def sleeper(self, **kwargs: Any) -> subprocess.Popen[Any]:
        return self.spawn([SLEEP, "1000"], **kwargs)

    def run_json(self, argv: list[str], timeout: float = 60.0) -> dict[str, Any]:
        """Run a child to completion and return the JSON object on its last stdout line."""
        proc = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{argv[:6]} failed ({proc.returncode}):\n{err}"
        lines = out.strip().splitlines()
        assert lines, f"no output from {argv[:6]}; stderr:\n{err}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def holder(self, argv: list[str], record_path: Path) -> subprocess.Popen[Any]:
        """Start a child that writes ``record_path`` and stays alive until its stdin closes."""
        log = self._tmp_path / f"holder-{len(self._procs)}.err"
        with log.open("wb") as err:
            proc = self.spawn(argv, stdin=subprocess.PIPE, stderr=err)

        def ready() -> bool:
            if record_path.exists():
                return True
            if proc.poll() is not None:
                pytest.fail(f"holder exited with {proc.returncode}:\n{log.read_text()}")
            return False

        poll_until(ready, f"{record_path.name} from {argv[:4]}")
        return proc

    @staticmethod
    def release(proc: subprocess.Popen[Any]) -> None:
        """Let a holder started by :meth:`holder` exit, and reap it."""
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.returncode is None:  # still ours (alive or an unreaped zombie): kill the group
                for kill in (os.killpg, os.kill):
                    with contextlib.suppress(ProcessLookupError):
                        kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    let_other_users_save_coverage()  # some children drop to OTHER_UID or NOBODY
    manager = Procs(tmp_path)
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture
def dead_pid(procs: Procs) -> tuple[int, int]:
    """(pid, start ticks) of a child that ran, exited and was reaped."""
    child = procs.sleeper()
    ticks = liveness.start_ticks(child.pid)
    assert ticks is not None
    child.kill()
    child.wait(timeout=30)
    return child.pid, ticks


@pytest.fixture
def zombie(procs: Procs) -> tuple[int, int]:
    """(pid, start ticks) of a child killed with SIGKILL and deliberately not reaped (yet)."""
    child = procs.sleeper()
    ticks = liveness.start_ticks(child.pid)
    assert ticks is not None
    os.kill(child.pid, signal.SIGKILL)
    poll_until(lambda: proc_state(child.pid) == "Z", f"pid {child.pid} to become a zombie")
    return child.pid, ticks


def require_unshare(*flags: str) -> None:
    if UNSHARE is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(
        [UNSHARE, *flags, "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare {' '.join(flags)} is not permitted here: {probe.stderr.strip()}")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create processes of other users")


def in_new_pid_ns(*argv: str, proc: bool = True) -> list[str]:
    assert UNSHARE is not None
    flags = ["--pid", "--fork", "--kill-child"] + (["--mount-proc"] if proc else [])
    return [UNSHARE, *flags, *argv]


# --------------------------------------------------------------------------------------------
# Same host, same boot, same pid namespace: the verdict is decided by the process itself.


@linux_proc_only("that /proc/PID/stat is parsed whatever the command name holds")
def test_a_holder_that_renamed_itself_to_any_bytes_is_judged(procs: Procs, tmp_path: Path) -> None:
    # The name in /proc/PID/stat is whatever the process set (prctl, /proc/self/comm):
    # spaces, parentheses, bytes that are not ASCII. The fields after it still decide.
    path = tmp_path / "owner.json"
    rename = "open('/proc/self/comm', 'wb').write('gw) \\xe9 (x'.encode())\n"
    script = HOLD_SCRIPT.replace("write_atomic(", rename + "write_atomic(", 1)
    holder = procs.holder([PY, "-c", script, str(path)], path)
    assert Path(f"/proc/{holder.pid}/comm").read_bytes() == "gw) \xe9 (x\n".encode()
    record = read_record(path)
    assert record is not None
    assert record.start_ticks == liveness.start_ticks(holder.pid) is not None
    assert str(liveness.classify(record)) == "alive, running"
    procs.release(holder)
    assert str(liveness.classify(record)) == "dead, no such process"


@linux_proc_only("that /proc alone serves a record and its judgement")
def test_writing_and_judging_records_on_linux_never_imports_psutil() -> None:
    # psutil costs 10 ms to import: the controller's end-of-run sweep and every waiter paid it.
    code = (
        "import os, subprocess, sys\n"
        "from pytest_prewarm import liveness\n"
        "gone = subprocess.Popen([sys.executable, '-c', 'pass']); gone.wait()\n"
        "mine = liveness.own_record('gw0', 'run')\n"
        "verdicts = [liveness.classify(mine), liveness.classify(mine._replace(pid=gone.pid))]\n"
        "liveness.prepare_classify()\n"
        "print([str(v) for v in verdicts], 'psutil' in sys.modules)\n"
    )
    out = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "['alive, running', 'dead, no such process'] False"


@linux_proc_only("that own_identity() records /proc start ticks")
def test_own_identity_matches_proc() -> None:
    pid, ticks, create_time = liveness.own_identity()
    assert pid == os.getpid()
    assert ticks is not None
    assert ticks == liveness.start_ticks(os.getpid())
    # Computed from the ticks without psutil, and exactly psutil's value: the portable path
    # judges this record with psutil's create_time.
    assert create_time == psutil.Process().create_time()


def test_local_host_identity() -> None:
    here = liveness.local_host()
    assert here.hostname == os.uname().nodename
    assert here.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert here.pid_ns == os.stat("/proc/self/ns/pid").st_ino


def test_start_ticks_survive_a_command_name_with_parentheses_and_spaces(procs: Procs) -> None:
    # The child renames itself on request; /proc/PID/stat then reads "PID (x) (y) 1 2 3) S ...",
    # where only the last ')' ends the name.
    code = (
        "import sys; sys.stdin.readline(); open('/proc/self/comm', 'w').write('x) (y) 1 2 3');"
        "print('renamed', flush=True); sys.stdin.read()"
    )
    child = procs.spawn([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    ticks = liveness.start_ticks(child.pid)
    assert ticks is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline() == "renamed\n"
    assert "(x) (y) 1 2 3)" in Path(f"/proc/{child.pid}/stat").read_text()
    assert liveness.start_ticks(child.pid) == ticks
    assert liveness.classify(record_for(child.pid, ticks)) == Verdict(ALIVE, "running")


def test_start_ticks_of_a_missing_pid_is_none(dead_pid: tuple[int, int]) -> None:
    assert liveness.start_ticks(dead_pid[0]) is None


def test_current_process_is_alive() -> None:
    verdict = liveness.classify(own_record())
    assert verdict == Verdict(ALIVE, "running")
    assert str(verdict) == "alive, running"


def test_current_process_is_alive_with_explicit_here() -> None:
    here = liveness.local_host()
    assert liveness.classify(own_record(), here) == Verdict(ALIVE, "running")


def test_live_child_is_alive(procs: Procs) -> None:
    child = procs.sleeper()
    verdict = liveness.classify(record_for(child.pid, liveness.start_ticks(child.pid)))
    assert verdict == Verdict(ALIVE, "running")


def test_child_that_exited_and_was_reaped_is_dead(dead_pid: tuple[int, int]) -> None:
    pid, ticks = dead_pid
    verdict = liveness.classify(record_for(pid, ticks))
    assert verdict.state is DEAD
    if psutil.pid_exists(pid):  # pragma: no cover - the pid was reused by someone else already
        assert "pid reused" in verdict.reason
    else:
        assert verdict.reason == "no such process"


def test_sigkilled_unreaped_child_is_dead_as_a_zombie(zombie: tuple[int, int]) -> None:
    pid, ticks = zombie
    # The trap: every cheap existence check calls the corpse alive.
    os.kill(pid, 0)
    assert psutil.pid_exists(pid)
    assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    verdict = liveness.classify(record_for(pid, ticks))
    assert verdict.state is DEAD
    assert "zombie" in verdict.reason


def test_live_pid_with_another_start_time_is_a_reused_pid(procs: Procs) -> None:
    child = procs.sleeper()
    ticks = liveness.start_ticks(child.pid)
    assert ticks is not None
    for recorded in (ticks - 1, ticks + 1, 0):
        verdict = liveness.classify(record_for(child.pid, recorded))
        assert verdict.state is DEAD
        assert "pid reused" in verdict.reason
    assert liveness.classify(record_for(child.pid, ticks)).state is ALIVE


def test_own_pid_with_another_start_time_is_a_reused_pid() -> None:
    pid = os.getpid()
    ticks = liveness.start_ticks(pid)  # what own_identity() records where it records ticks
    assert ticks is not None
    verdict = liveness.classify(record_for(pid, ticks + 12345))
    assert verdict.state is DEAD
    assert "pid reused" in verdict.reason


def test_real_pid_reuse_is_dead(procs: Procs) -> None:
    """A new process really gets the recorded pid (steered with ns_last_pid in a private ns)."""
    require_root()
    require_unshare("--pid", "--fork", "--mount-proc")
    out = procs.run_json(in_new_pid_ns(PY, "-c", REUSE_SCRIPT, SLEEP))
    assert out["second"] == out["first"], out
    assert out["second_ticks"] != out["ticks"], out
    assert out["before"] == {"state": "alive", "reason": "running"}, out
    assert out["after_exit"] == {"state": "dead", "reason": "no such process"}, out
    assert out["reused"]["state"] == "dead", out
    assert "pid reused" in out["reused"]["reason"], out


def test_no_record_is_unknown() -> None:
    verdict = liveness.classify(None)
    assert verdict.state is UNKNOWN
    assert liveness.classify(None, liveness.local_host()).state is UNKNOWN


# --------------------------------------------------------------------------------------------
# Anything not provably of this host, boot and pid namespace is unknown, whatever its pid says.

# Record fields that make the owner foreign or unverifiable.
FOREIGN_RECORDS: dict[str, Callable[[HostIdentity], dict[str, Any]]] = {
    "other host": lambda here: {"hostname": here.hostname + "-elsewhere"},
    "empty hostname": lambda here: {"hostname": ""},
    "no hostname (older version)": lambda here: {"hostname": None},
    "other boot": lambda here: {"boot_id": "00000000-0000-4000-8000-000000000000"},
    "no boot id": lambda here: {"boot_id": None},
    "other pid namespace": lambda here: {"pid_ns": (here.pid_ns or 0) + 1},
    "no pid namespace": lambda here: {"pid_ns": None},
    # Neither start time: which one identifies the process depends on the code path.
    "no start ticks": lambda here: {"start_ticks": None, "create_time": None},
}

# What the local side may fail to know.
BLIND_HERE: dict[str, Callable[[HostIdentity], HostIdentity]] = {
    "here has no boot id": lambda here: here._replace(boot_id=None),
    "here has no pid namespace": lambda here: here._replace(pid_ns=None),
    "here has another hostname": lambda here: here._replace(hostname="somewhere"),
}


@pytest.fixture(params=["dead", "zombie", "reused", "alive"])
def subject(request: pytest.FixtureRequest, procs: Procs) -> tuple[int, int]:
    """A (pid, ticks) that a same-host record would classify as dead, dead, dead or alive."""
    if request.param == "dead":
        result: tuple[int, int] = request.getfixturevalue("dead_pid")
        return result
    if request.param == "zombie":
        result = request.getfixturevalue("zombie")
        return result
    child = procs.sleeper()
    ticks = liveness.start_ticks(child.pid)
    assert ticks is not None
    return child.pid, ticks + 1 if request.param == "reused" else ticks


@pytest.mark.parametrize("foreign", list(FOREIGN_RECORDS))
def test_foreign_or_incomplete_record_is_unknown(foreign: str, subject: tuple[int, int]) -> None:
    here = liveness.local_host()
    pid, ticks = subject
    record = record_for(pid, ticks, here, **FOREIGN_RECORDS[foreign](here))
    verdict = liveness.classify(record, here)
    assert verdict.state is UNKNOWN, verdict
    assert liveness.classify(record).state is UNKNOWN


@pytest.mark.parametrize("blind", list(BLIND_HERE))
def test_local_side_without_identity_judges_nothing(blind: str, subject: tuple[int, int]) -> None:
    here = liveness.local_host()
    pid, ticks = subject
    record = record_for(pid, ticks, here)
    assert liveness.classify(record, BLIND_HERE[blind](here)).state is UNKNOWN


def test_both_sides_missing_boot_id_or_namespace_is_still_unknown(
    dead_pid: tuple[int, int],
) -> None:
    """None == None must not count as "the same boot" or "the same namespace"."""
    here = liveness.local_host()
    for field in ("boot_id", "pid_ns"):
        blind = here._replace(**{field: None})
        record = record_for(*dead_pid, blind)
        assert getattr(record, field) is None
        assert liveness.classify(record, blind).state is UNKNOWN


def test_eve_style_record_for_a_dead_pid_is_unknown(
    tmp_path: Path, dead_pid: tuple[int, int]
) -> None:
    """The old lock wrote only {pid, hostname}: even for a dead pid that proves nothing."""
    path = tmp_path / "owner.json"
    path.write_text(json.dumps({"pid": dead_pid[0], "hostname": liveness.local_host().hostname}))
    record = read_record(path)
    assert record is not None
    assert liveness.classify(record).state is UNKNOWN


def test_reasons_say_why_a_record_is_unknown(dead_pid: tuple[int, int]) -> None:
    here = liveness.local_host()
    reasons = {
        name: liveness.classify(record_for(*dead_pid, here, **make(here)), here).reason
        for name, make in FOREIGN_RECORDS.items()
    }
    assert "another host" in reasons["other host"]
    assert "no host" in reasons["no hostname (older version)"]
    assert "boot" in reasons["other boot"]
    assert "boot" in reasons["no boot id"]
    assert "namespace" in reasons["other pid namespace"]
    assert "namespace" in reasons["no pid namespace"]
    assert "start time" in reasons["no start ticks"]


def test_holder_in_another_uts_namespace_is_unknown(procs: Procs, tmp_path: Path) -> None:
    require_unshare("--uts")
    assert UNSHARE is not None
    path = tmp_path / "owner.json"
    holder = procs.holder([UNSHARE, "--uts", PY, "-c", HOLD_SCRIPT, str(path), "elsewhere"], path)
    record = read_record(path)
    assert record is not None
    assert record.hostname == "elsewhere"
    verdict = liveness.classify(record)
    assert verdict.state is UNKNOWN
    assert "another host" in verdict.reason
    procs.release(holder)
    assert liveness.classify(record).state is UNKNOWN  # dead there, still unknown here


# --------------------------------------------------------------------------------------------
# Other users: EPERM and AccessDenied mean "exists"; absence from a hidepid /proc proves nothing.


def test_another_users_process_is_alive_to_an_unprivileged_observer(
    procs: Procs, dead_pid: tuple[int, int]
) -> None:
    require_root()
    other = procs.sleeper(user=NOBODY, group=NOBODY, extra_groups=[])
    assert psutil.Process(other.pid).uids().real == NOBODY
    records = [
        record_for(other.pid, liveness.start_ticks(other.pid)).to_json(),
        record_for(*dead_pid).to_json(),
    ]
    out = procs.run_json(
        [PY, "-c", CLASSIFY_SCRIPT, json.dumps({"records": records, "uid": OTHER_UID})]
    )
    assert out["uid"] == OTHER_UID
    live, gone = out["verdicts"]
    assert live["kill"] == "EPERM"  # kill(pid, 0) is refused: the process exists
    assert live["state"] == "alive", live
    assert gone["kill"] == "ESRCH"
    assert gone["state"] == "dead", gone


@pytest.mark.parametrize(
    ("hidepid", "expected_reason"),
    [
        pytest.param("1", "exists (access denied)", id="hidepid=1-access-denied"),
        pytest.param("2", "exists but hidden from /proc", id="hidepid=2-invisible"),
    ],
)
def test_hidepid_proc_does_not_make_another_users_process_dead(
    procs: Procs, hidepid: str, expected_reason: str
) -> None:
    require_root()
    require_unshare("--mount", "--pid", "--fork", "--mount-proc")
    assert UNSHARE is not None
    argv = [UNSHARE, "--mount", "--pid", "--fork", "--kill-child", PY, "-c", HIDEPID_SCRIPT]
    out = procs.run_json([*argv, hidepid, SLEEP, str(NOBODY), str(OTHER_UID)])
    assert out["uid"] == OTHER_UID
    assert any("hidepid" in line for line in out["mounts"]), out["mounts"]
    assert out["kill"] == "EPERM"
    if hidepid == "2":
        # The trap from facts.md: the live process is gone from /proc and psutil says so.
        assert out["proc_dir_visible"] is False
        assert out["psutil_pid_exists"] is False
    assert out["live"] == {"state": "alive", "reason": expected_reason}, out
    assert out["gone"] == {"state": "dead", "reason": "no such process"}, out


# --------------------------------------------------------------------------------------------
# Other pid namespaces on the same host (same hostname, same boot id).


def test_live_holder_in_another_pid_namespace_is_unknown_not_dead(
    procs: Procs, tmp_path: Path, dead_pid: tuple[int, int]
) -> None:
    require_unshare("--pid", "--fork", "--mount-proc")
    here = liveness.local_host()
    path = tmp_path / "owner.json"
    holder = procs.holder(in_new_pid_ns(PY, "-c", HOLD_SCRIPT, str(path)), path)
    record = read_record(path)
    assert record is not None
    # Same host and boot, but its pid means something else out here (pid 1 is our init).
    assert record.pid == 1
    assert record.hostname == here.hostname
    assert record.boot_id == here.boot_id
    assert record.pid_ns not in (None, here.pid_ns)
    verdict = liveness.classify(record)
    assert verdict.state is UNKNOWN
    assert "namespace" in verdict.reason
    # Whatever its pid happens to name out here (dead, our own pid, a zombie), never dead.
    for pid, ticks in [dead_pid, (os.getpid(), 0), (os.getpid(), record.start_ticks)]:
        forged = record._replace(pid=pid, start_ticks=ticks)
        assert liveness.classify(forged).state is UNKNOWN
    assert holder.poll() is None  # it was alive throughout
    procs.release(holder)


def test_holder_in_another_pid_namespace_that_died_is_still_unknown(
    procs: Procs, tmp_path: Path
) -> None:
    require_unshare("--pid", "--fork", "--mount-proc")
    path = tmp_path / "owner.json"
    holder = procs.holder(in_new_pid_ns(PY, "-c", HOLD_SCRIPT, str(path)), path)
    procs.release(holder)
    record = read_record(path)
    assert record is not None
    assert liveness.classify(record).state is UNKNOWN


def test_zombie_in_another_pid_namespace_is_unknown(procs: Procs, tmp_path: Path) -> None:
    require_unshare("--pid", "--fork", "--mount-proc")
    path = tmp_path / "owner.json"
    holder = procs.holder(in_new_pid_ns(PY, "-c", ZOMBIE_IN_NS_SCRIPT, str(tmp_path), SLEEP), path)
    inside = json.loads((tmp_path / "inside.json").read_text())
    # Inside its own namespace the record is provably a zombie, and kill(pid, 0) succeeds there.
    assert inside["state"] == "dead", inside
    assert "zombie" in inside["reason"]
    assert inside["kill"] == "ok"
    record = read_record(path)
    assert record is not None
    verdict = liveness.classify(record)
    assert verdict.state is UNKNOWN
    assert "namespace" in verdict.reason
    procs.release(holder)


def test_outside_records_are_unknown_from_inside_another_pid_namespace(
    procs: Procs, dead_pid: tuple[int, int], zombie: tuple[int, int]
) -> None:
    require_unshare("--pid", "--fork", "--mount-proc")
    child = procs.sleeper()
    records = [
        own_record().to_json(),  # alive out here, no such pid in there: ESRCH inside
        record_for(child.pid, liveness.start_ticks(child.pid)).to_json(),
        record_for(*dead_pid).to_json(),
        record_for(*zombie).to_json(),
    ]
    out = procs.run_json(in_new_pid_ns(PY, "-c", CLASSIFY_SCRIPT, json.dumps({"records": records})))
    assert out["here"]["pid_ns"] != liveness.local_host().pid_ns
    assert out["here"]["hostname"] == liveness.local_host().hostname
    for verdict in out["verdicts"]:
        assert verdict["state"] == "unknown", out
        assert "namespace" in verdict["reason"]
    assert out["verdicts"][0]["kill"] == "ESRCH"  # what a hostname-only check would call dead


def test_holder_and_observer_in_one_private_namespace_judge_normally(
    procs: Procs, tmp_path: Path
) -> None:
    """Control: classification inside one namespace (with its own /proc) works as on the host."""
    require_unshare("--pid", "--fork", "--mount-proc")
    path = tmp_path / "owner.json"
    script = (
        _PRELUDE
        + r"""
path = Path(sys.argv[1])
code = sys.argv[2]
holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE)
deadline = time.monotonic() + 30
while not path.exists():
    if holder.poll() is not None or time.monotonic() > deadline:
        raise SystemExit("holder did not write its record")
    time.sleep(0.001)
record = parse_record(path.read_text())
alive = verdict(record)
holder.stdin.close()
holder.wait()
print(json.dumps({"pid": record.pid, "alive": alive, "dead": verdict(record)}))
"""
    )
    out = procs.run_json(in_new_pid_ns(PY, "-c", script, str(path), HOLD_SCRIPT))
    assert out["alive"] == {"state": "alive", "reason": "running"}, out
    assert out["dead"] == {"state": "dead", "reason": "no such process"}, out


# --------------------------------------------------------------------------------------------
# A pid namespace that still sees its parent's /proc (`unshare --pid --fork`, no --mount-proc;
# also sandboxes that share the host's /proc). /proc/PID there names the *parent's* PID, a
# different process from our PID. Nothing read from that /proc may be taken as proof.


def test_own_identity_under_the_parents_proc_is_ours_or_unknown(procs: Procs) -> None:
    require_unshare("--pid", "--fork")
    out = procs.run_json(in_new_pid_ns(PY, "-c", PARENT_PROC_IDENTITY_SCRIPT, proc=False))
    assert out["getpid"] != out["proc_self"]  # the set-up: /proc belongs to another namespace
    recorded_ticks = out["own_identity"][1]
    assert recorded_ticks in (None, out["true_ticks"]), (
        f"own_identity() recorded start ticks {recorded_ticks} of the parent namespace's pid "
        f"{out['getpid']}, not its own {out['true_ticks']}"
    )


def test_live_holder_is_never_dead_under_the_parents_proc(
    procs: Procs, zombie: tuple[int, int]
) -> None:
    """The holder's pid inside equals the pid of a zombie outside: that zombie is not the holder."""
    require_root()
    require_unshare("--pid", "--fork")
    target, _ = zombie
    out = procs.run_json(
        in_new_pid_ns(PY, "-c", PARENT_PROC_COLLISION_SCRIPT, str(target), proc=False)
    )
    assert out["holder_pid"] == target, out  # set-up: the collision really happened
    assert out["alive_check"] == "ok", out  # the holder was alive when it was classified
    assert out["while_alive"]["state"] != "dead", out


def test_dead_holder_is_not_alive_under_the_parents_proc(procs: Procs) -> None:
    """The holder's pid inside equals a live pid outside: that process is not the holder."""
    require_root()
    require_unshare("--pid", "--fork")
    bystander = procs.sleeper()
    out = procs.run_json(
        in_new_pid_ns(PY, "-c", PARENT_PROC_COLLISION_SCRIPT, str(bystander.pid), proc=False)
    )
    assert out["holder_pid"] == bystander.pid, out
    assert out["exit_check"] == "ESRCH", out  # the holder is gone in its namespace
    assert out["after_exit"]["state"] != "alive", out


# --------------------------------------------------------------------------------------------
# No /proc at all (a container that mounts none): nothing can be proven, and nothing fails.

NO_PROC_SCRIPT = r"""
import json, os, subprocess, sys
from pathlib import Path
import psutil
from pytest_prewarm import liveness
from pytest_prewarm.lockdir import choose_lock_mode, filesystem_type

record = liveness.own_record("gw0", "run")  # while /proc is still there: a complete record
liveness.prepare_classify()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "no-proc", "/proc"], check=True)
print(json.dumps({
    "proc_self": os.path.lexists("/proc/self"),
    "own_identity": liveness.own_identity(),
    "here": liveness.local_host()._asdict(),
    "verdict": str(liveness.classify(record)),
    "fstype": filesystem_type(Path(sys.argv[1])),
    "mode": choose_lock_mode(Path(sys.argv[1]), "auto"),
}))
"""


@linux_proc_only("what the Linux path does without /proc")
def test_without_proc_nothing_is_proven_and_a_lock_dir_still_works(
    procs: Procs, tmp_path: Path
) -> None:
    require_root()
    require_unshare("--mount")
    assert UNSHARE is not None

    out = procs.run_json([UNSHARE, "--mount", PY, "-c", NO_PROC_SCRIPT, str(tmp_path)])

    assert out["proc_self"] is False
    _, ticks, created = out["own_identity"]
    assert (ticks, created) == (None, None)  # no start token: its own record proves nothing
    assert out["here"]["boot_id"] is None  # neither /proc's boot id nor psutil's boot time
    assert out["here"]["pid_ns"] is None
    assert out["verdict"] == "unknown, boot id unrecorded"
    assert out["fstype"] is None
    assert out["mode"] == ["flock", "auto: local filesystem supports flock"]


@pytest.mark.parametrize("pid", [0, -1, MAX_PID + 1])
def test_a_pid_out_of_the_kernels_range_is_unknown(pid: int) -> None:
    record = own_record()._replace(pid=pid)

    assert liveness.classify(record) == Verdict(UNKNOWN, f"pid {pid} is out of range")
