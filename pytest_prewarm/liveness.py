"""Is a lock holder dead, alive or unknown? The only module that imports psutil.

"Dead" must be proven: a wrong "dead" lets two builders race, while a wrong "unknown"
only costs a wait bounded by the stale window. So every path that cannot prove death
returns alive or unknown.

On Linux, records are written and judged from /proc alone; psutil serves the portable
path (macOS, Windows, or forced), and fallbacks where /proc lacks something.
"""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import errno
import os
import socket
import sys
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, NamedTuple

from . import clock, portable
from .owner import MAX_PID, OwnerRecord

if TYPE_CHECKING:
    import psutil


class Liveness(Enum):
    DEAD = "dead"
    ALIVE = "alive"
    UNKNOWN = "unknown"


class Verdict(NamedTuple):
    state: Liveness
    reason: str

    def __str__(self) -> str:
        return f"{self.state.value}, {self.reason}"


class HostIdentity(NamedTuple):
    hostname: str
    boot_id: str | None
    pid_ns: int | None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def boot_id() -> str | None:
    """The kernel's random per-boot id, or the boot time where /proc lacks it (macOS)."""
    found = _read_text("/proc/sys/kernel/random/boot_id")
    if found:
        return found
    import psutil  # on first use: most pytest processes never judge a holder

    try:
        return f"boot-time:{psutil.boot_time():.0f}"
    except (psutil.Error, OSError):
        return None


def _proc_is_ours() -> bool:
    """Whether /proc shows our own pid namespace.

    After ``unshare --pid --fork`` without a fresh /proc mount (and in sandboxes sharing
    the host's /proc), /proc/N is the *parent* namespace's pid N: reading it would judge
    some other process. Then nothing in /proc proves anything about our pids.
    """
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


# Linux has pid namespaces and /proc start ticks; macOS and Windows have one pid space per
# host and identify a process by psutil's create_time instead.
LINUX = sys.platform.startswith("linux")


def _by_ticks() -> bool:
    """Whether processes are identified by /proc start ticks (else by create_time)."""
    return LINUX and not portable.forced()


def pid_namespace() -> int | None:
    """Inode of this process's pid namespace, which tells containers on one host apart.

    ``None`` (so every judgement is "unknown") when /proc belongs to another namespace;
    0 where the platform has no pid namespaces (one pid space per host).
    """
    if not LINUX:
        return 0  # pragma: no cover - macOS and Windows only
    if not _proc_is_ours():
        return None
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()

# Indexes into _read_stat's fields (fields 3, 9 and 22 of proc(5), counted from 1).
_STATE, _FLAGS, _START_TICKS = 0, 6, 19


def _read_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name; raises OSError as open() does.

    The command name (field 2) may hold spaces, parentheses and any bytes (a process may
    rename itself); the fields after the last ')' are fixed and ASCII. Field 3 (the state)
    is at index 0 there.
    """
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    return data.rpartition(b")")[2].decode("ascii", "replace").split()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return _read_stat(pid)
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat).

    Unlike ``create_time()`` this does not move when the wall clock is stepped.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        return int(fields[_START_TICKS])
    except (IndexError, ValueError):
        return None


def local_host() -> HostIdentity:
    # Not cached: a test may run us inside a new UTS or pid namespace after import.
    return HostIdentity(socket.gethostname(), boot_id(), pid_namespace())


@cache
def _own_create_time(pid: int) -> float | None:
    import psutil  # on first use: most pytest processes never judge a holder

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _boot_time() -> float | None:
    """The ``btime`` line of /proc/stat: the wall time of boot, in whole seconds."""
    try:
        with open("/proc/stat", "rb") as handle:
            for line in handle:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _create_time_from_ticks(pid: int, ticks: int) -> float | None:
    """psutil's ``create_time()`` on Linux, from start ticks we read anyway: the same sum
    of the same two values, so a record written here matches psutil's judgement exactly.

    Every template's first request names its holder, and importing psutil for this one
    number cost 10 ms of CPU in each process (40 ms of wall time with 8 workers on two
    cores), before the builder could take the lock.
    """
    boot = _boot_time()
    if boot is None or not sys.platform.startswith("linux"):  # (for mypy: only Linux has ticks)
        return _own_create_time(pid)
    return ticks / os.sysconf("SC_CLK_TCK") + boot


def own_identity(pid: int | None = None) -> tuple[int, int | None, float | None]:
    """(pid, start ticks, create time) of the calling process, or of ``pid`` on this host.

    Start ticks exist only where /proc does (Linux, unless the portable path is forced);
    elsewhere create_time is the start token.
    """
    pid = os.getpid() if pid is None else pid
    if not LINUX:
        return pid, None, _own_create_time(pid)  # pragma: no cover - macOS and Windows only
    if not _proc_is_ours():
        return pid, None, None
    if not _by_ticks():  # the portable path, forced: psutil alone, as on macOS
        return pid, None, _own_create_time(pid)
    ticks = start_ticks(pid)
    if ticks is None:
        return pid, None, _own_create_time(pid)
    return pid, ticks, _create_time_from_ticks(pid, ticks)


def own_record(worker: str, run_id: str, pid: int | None = None) -> OwnerRecord:
    """An owner record naming the calling process (``started_at`` left at 0).

    ``pid`` names another process of this host and pid namespace instead: a worker that
    creates the run's lock dir records the controller, which outlives it.
    """
    pid, ticks, created = own_identity(pid)
    here = local_host()
    return OwnerRecord(
        pid=pid,
        hostname=here.hostname,
        boot_id=here.boot_id,
        pid_ns=here.pid_ns,
        start_ticks=ticks,
        create_time=created,
        worker=worker,
        run_id=run_id,
        started_at=0.0,
    )


class Identity:
    """This process as a lock holder: its owner record, read once per process.

    Who we are does not change within a process (a forked child has another pid and reads
    its own), so a takeover's attempts do not re-read /proc each time.
    """

    def __init__(self, worker: str, run_id: str) -> None:
        self.worker = worker
        self.run_id = run_id
        self._base: OwnerRecord | None = None

    def record(self, template: str) -> OwnerRecord:
        """A fresh owner record naming this process as holder of ``template``, from now."""
        if self._base is None or self._base.pid != os.getpid():
            self._base = own_record(self.worker, self.run_id)
        return self._base._replace(started_at=clock.wall(), template=template)


def _foreign(record: OwnerRecord, here: HostIdentity) -> str | None:
    """Why ``record`` cannot be judged from here, or ``None`` if it can."""
    if record.hostname is None:
        return "the record names no host (written by an older version?)"
    if record.hostname != here.hostname:
        return f"it ran on another host ({record.hostname})"
    if record.boot_id is None or here.boot_id is None:
        return "boot id unrecorded"
    if record.boot_id != here.boot_id:
        return "it ran in another boot of this host, or on a host with the same name"
    if record.pid_ns is None or here.pid_ns is None:
        return "pid namespace unrecorded"
    if record.pid_ns != here.pid_ns:
        return "it runs in another pid namespace"
    return None


def _exists_by_signal(pid: int) -> bool | None:
    """True/False when kill(pid, 0) proves it; EPERM means it exists but is not ours."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:  # pragma: no cover - no other errno is documented for kill(pid, 0)
        return True if exc.errno == errno.EPERM else None
    return True


def classify(record: OwnerRecord | None, here: HostIdentity | None = None) -> Verdict:
    """Decide whether the holder described by ``record`` is dead, alive or unknown."""
    if record is None:
        return Verdict(Liveness.UNKNOWN, "no readable owner record")
    here = here if here is not None else local_host()
    why = _foreign(record, here)
    if why is not None:
        return Verdict(Liveness.UNKNOWN, why)
    by_ticks = _by_ticks()
    if by_ticks and (record.start_ticks is None or record.start_ticks < 0):
        return Verdict(Liveness.UNKNOWN, "start time unrecorded")
    if not by_ticks and record.create_time is None:
        return Verdict(Liveness.UNKNOWN, "start time unrecorded")
    if not 0 < record.pid <= MAX_PID:
        return Verdict(Liveness.UNKNOWN, f"pid {record.pid} is out of range")
    if by_ticks:
        return _classify_by_proc(record)
    import psutil  # the portable path: psutil reads what the platform offers

    try:
        proc = psutil.Process(record.pid)
        status = proc.status()
    except psutil.NoSuchProcess:
        if not LINUX:
            # No hidepid outside Linux, and os.kill(pid, 0) on Windows sends CTRL_C_EVENT.
            return Verdict(Liveness.DEAD, "no such process")  # pragma: no cover
        return _absent_from_proc(record.pid)
    except psutil.AccessDenied:
        return Verdict(Liveness.ALIVE, "exists (access denied)")
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return Verdict(Liveness.DEAD, status)  # an unreaped corpse holds no lock
    started = _created_matches(proc, record)
    if started is None:
        # Without a start time a reused pid cannot be told from the holder.
        return Verdict(Liveness.UNKNOWN, "start time unreadable")
    if not started:
        return Verdict(Liveness.DEAD, "pid reused by a newer process")
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        # Alive all the same: SIGCONT (or the debugger) lets it go on, so it is never robbed.
        return Verdict(Liveness.ALIVE, "stopped")
    return Verdict(Liveness.ALIVE, "running")


def _absent_from_proc(pid: int) -> Verdict:
    # With hidepid=2 another user's live process is invisible in /proc: only ESRCH from
    # kill() proves it is gone.
    exists = _exists_by_signal(pid)
    if exists is False:
        return Verdict(Liveness.DEAD, "no such process")
    if exists is True:
        return Verdict(Liveness.ALIVE, "exists but hidden from /proc")
    return Verdict(Liveness.UNKNOWN, "existence could not be checked")  # pragma: no cover


# psutil's names for the /proc states that decide a verdict, so verdicts read the same on
# both paths.
_CORPSE_STATES = {"Z": "zombie", "X": "dead", "x": "dead"}
_STOPPED_STATES = frozenset({"T", "t"})


def _classify_by_proc(record: OwnerRecord) -> Verdict:
    """The Linux verdict from one read of /proc/PID/stat: what psutil reads, without it.

    Importing psutil costs 10 ms of CPU, paid by the controller's end-of-run sweep and by
    every waiter; one read is also one snapshot, where psutil's status and the start ticks
    were two reads a pid could be reused between. Same order of proofs as the psutil path.
    """
    try:
        fields = _read_stat(record.pid)
    except PermissionError:  # hidepid=1: the process is there, its files are not ours
        return Verdict(Liveness.ALIVE, "exists (access denied)")
    except OSError:  # gone, or hidden (hidepid=2)
        return _absent_from_proc(record.pid)
    try:
        state, flags = fields[_STATE], int(fields[_FLAGS])
        ticks = int(fields[_START_TICKS])
    except (IndexError, ValueError):
        # Without a start time a reused pid cannot be told from the holder.
        return Verdict(Liveness.UNKNOWN, "start time unreadable")
    if state in _CORPSE_STATES:
        return Verdict(Liveness.DEAD, _CORPSE_STATES[state])  # an unreaped corpse holds no lock
    if ticks != record.start_ticks:
        return Verdict(Liveness.DEAD, "pid reused by a newer process")
    if flags & PF_EXITING:
        # Inside exit(), not yet a zombie: a SIGKILLed process drops its flocks early in
        # exit while its state still reads running; whoever was granted the lock in that
        # window must not take it for alive.
        return Verdict(Liveness.DEAD, "exiting")
    if state in _STOPPED_STATES:
        # Alive all the same: SIGCONT (or the debugger) lets it go on, so it is never robbed.
        return Verdict(Liveness.ALIVE, "stopped")
    return Verdict(Liveness.ALIVE, "running")


# psutil derives create_time from the boot time and the start ticks on Linux and from the
# kernel's start timestamp elsewhere (microseconds on macOS, 100 ns on Windows): the same
# process reads the same value each time, while a reused pid belongs to a process started
# later. Half of Linux's 10 ms tick (USER_HZ is 100): at a whole tick, float rounding of
# ticks / 100 decided whether a pid reused one tick later matched its holder.
CREATE_TIME_TOLERANCE = 0.005


def _created_matches(proc: "psutil.Process", record: OwnerRecord) -> bool | None:
    """Start-time check where /proc has no start ticks (macOS, Windows): psutil's create_time.

    It moves when the wall clock is stepped, so a holder started before a clock step reads
    as a reused pid there; the docs say so (how-it-works.md, platforms).
    """
    import psutil

    try:
        created = proc.create_time()
    except psutil.Error:
        return None
    assert record.create_time is not None
    return abs(created - record.create_time) <= CREATE_TIME_TOLERANCE


def prepare_classify() -> None:
    """Import what ``classify`` needs now, so a later takeover does not wait for it."""
    if not _by_ticks():  # /proc alone serves the Linux path
        import psutil  # noqa: F401


def held_for(record: OwnerRecord) -> float:
    """Seconds since the holder took the lock, by its wall clock (for messages only)."""
    return max(0.0, clock.wall() - record.started_at)


def identity_of(pid: int) -> tuple[int, int | None, float | None]:
    """(pid, start ticks, create time) of process ``pid``, as ``own_identity`` gives them."""
    return own_identity(pid)
