"""The kernel lock: a raw flock that forked and exec'd children cannot keep, and its fallback.

A flock belongs to the open file description, so whoever shares the descriptor shares the
lock (../shared/design/facts.md). A builder that forks (a server daemonising itself,
multiprocessing's fork start method) must not hand the lock to a child that outlives it,
and a child that exits must not take the parent's lock with it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import Processes, Tmpfs, use_up_inodes, wait_until

from pytest_prewarm import kernel
from pytest_prewarm.portable import PORTABLE_ENV

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="forked children exist on POSIX only"
)

# Takes the lock on argv[1], then does what argv[2] says, then reports on stdout.
HOLDER = """
import os, subprocess, sys, time
from pathlib import Path
from pytest_prewarm import kernel

lock = kernel.kernel_lock(Path(sys.argv[1]))
assert lock.try_lock()
what = sys.argv[2]
if what == "fork-and-stay":
    pid = os.fork()
    if pid == 0:
        # The child closes its copy in the after-fork hook, before os.fork returns here; a
        # kill of the parent before the child has run that far would find the copy still
        # open, so the child says when it is past it.
        print("past the fork hook", flush=True)
        os.read(os.open(sys.argv[3], os.O_RDONLY), 1)  # a FIFO nobody writes: stays alive
        os._exit(0)
    print("child", pid, flush=True)
elif what == "fork-and-exit":
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child gone", os.waitstatus_to_exitcode(status), flush=True)
elif what == "fork-and-unlock":
    # A child that unwinds through the holder's release: its inherited copy is already
    # closed, and the number may belong to a file of its own by now.
    pid = os.fork()
    if pid == 0:
        mine = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT)
        lock.unlock()
        os.write(mine, b"still mine")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child gone", os.waitstatus_to_exitcode(status), flush=True)
elif what == "exec-and-stay":
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.read(os.open(sys.argv[1], os.O_RDONLY), 1)",
         sys.argv[3]],
        close_fds=False,  # only close-on-exec keeps the lock from it
    )
    print("child", child.pid, flush=True)
print("holding", flush=True)
time.sleep(600)
"""


def _child_pid(proc_output: str) -> int:
    line = next(line for line in proc_output.splitlines() if line.startswith("child"))
    return int(line.split()[-1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["fork-and-stay", "exec-and-stay"])
def test_a_child_that_outlives_the_killed_holder_does_not_keep_the_lock(
    processes: Processes, tmp_path: Path, how: str
) -> None:
    path, fifo = tmp_path / "lock", tmp_path / "fifo"
    os.mkfifo(fifo)
    holder = processes.python(HOLDER, str(path), how, str(fifo))
    wait_until(lambda: "holding" in holder.output(), what="the holder to take the lock")
    if how == "fork-and-stay":
        wait_until(lambda: "past the fork hook" in holder.output(), what="the child's fork hook")
    child = _child_pid(holder.output())
    mine = kernel.kernel_lock(path)
    assert mine is not None
    assert not mine.try_lock(), "the holder's lock did not exclude"
    holder.kill()
    assert _alive(child), "the child must still live for the test to mean anything"
    assert mine.try_lock(), f"the {how} child (pid {child}) kept the killed holder's lock"
    mine.unlock()
    os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("how", ["fork-and-exit", "fork-and-unlock"])
def test_a_forked_child_that_exits_or_unlocks_leaves_the_parent_holding(
    processes: Processes, tmp_path: Path, how: str
) -> None:
    path, own = tmp_path / "lock", tmp_path / "childs-own-file"
    holder = processes.python(HOLDER, str(path), how, str(own))
    wait_until(lambda: "holding" in holder.output(), what="the holder to take the lock")
    assert "child gone 0" in holder.output(), holder.output()
    if how == "fork-and-unlock":
        assert own.read_bytes() == b"still mine"  # its unlock did not close the child's file
    mine = kernel.kernel_lock(path)
    assert mine is not None
    assert not mine.try_lock(), f"the {how} child released its live parent's lock"
    holder.kill()
    assert mine.try_lock()
    mine.unlock()


def test_two_locks_of_one_process_exclude_each_other_and_unlock_frees(tmp_path: Path) -> None:
    # A flock is per open file, not per process (unlike lockf): threads of one worker, such as
    # eager builds, exclude each other too.
    first, second = kernel.kernel_lock(tmp_path / "lock"), kernel.kernel_lock(tmp_path / "lock")
    assert first is not None
    assert second is not None
    assert first.try_lock()
    assert not second.try_lock()
    first.unlock()
    assert second.try_lock()
    second.unlock()
    second.unlock()  # a second unlock is a no-op, never an error


@pytest.mark.parametrize(
    ("plant", "error"),
    [
        ("fifo", "not a regular file"),
        ("symlink", "symbolic links"),  # ELOOP from O_NOFOLLOW
        ("directory", "directory"),
    ],
)
def test_a_planted_lock_file_raises_at_once_and_changes_nothing(
    tmp_path: Path, plant: str, error: str
) -> None:
    path, outside = tmp_path / "lock", tmp_path / "outside"
    outside.write_text("not yours")
    if plant == "fifo":
        os.mkfifo(path)  # an open that blocked here would hang every waiter
    elif plant == "symlink":
        path.symlink_to(outside)
    else:
        path.mkdir()
    lock = kernel.kernel_lock(path)
    assert lock is not None
    if plant == "fifo" and type(lock).__name__ != "_Flock":
        # filelock's lock (the forced portable path) may lock a FIFO without hanging; the
        # lock file is checked before any lock is tried (test_hostile_lockdir.py).
        pytest.skip("the raw flock's own check; filelock's lock is in use here")
    with pytest.raises(OSError, match=error):
        lock.try_lock()
    assert outside.read_text() == "not yours"
    assert kernel.forget(-1) is False  # nothing was left tracked for a fork to close


def test_the_forced_portable_path_locks_through_filelock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: Processes
) -> None:
    monkeypatch.setenv(PORTABLE_ENV, "1")
    lock = kernel.kernel_lock(tmp_path / "lock")
    assert type(lock).__name__ == "_PlatformLock"
    assert lock.try_lock()
    other = processes.spawn(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from pytest_prewarm import kernel; "
            "print('taken' if kernel.kernel_lock(Path(sys.argv[1])).try_lock() else 'refused')",
            str(tmp_path / "lock"),
        ],
        env={PORTABLE_ENV: "1"},
    )
    assert other.wait() == 0
    assert other.output().strip() == "refused"
    lock.unlock()
    kernel.warm_up(tmp_path / "warm")  # loads filelock's lazy parts; must not raise
    assert "filelock" in sys.modules


def test_a_lock_file_that_cannot_be_created_on_a_full_disk_says_so(tmpfs: Tmpfs) -> None:
    # The owner record's temporary file takes the last inode; the lock file finds none.
    from pytest_prewarm.exceptions import PrewarmLockError
    from pytest_prewarm.flock import FlockLock
    from pytest_prewarm.layout import Layout
    from pytest_prewarm.liveness import own_record

    root = tmpfs.mount("size=1m,nr_inodes=64")
    (root / "locks").mkdir()
    lock = FlockLock(Layout(root), "db.1234", "db")
    use_up_inodes(root)[-1].unlink()
    with pytest.raises(PrewarmLockError) as raised:
        lock.try_acquire(own_record("gw0", "run"))
    assert str(raised.value).startswith(
        f"cannot create the lock file {root / 'locks' / 'db.1234.lock'} for template 'db': "
        "No space left on device."
    )
    assert not any(p.name.startswith("db.1234") for p in (root / "locks").iterdir())


FORK_DURING_REGISTRATION = """
import os, sys, threading
from pathlib import Path
from pytest_prewarm import kernel

opened, forked = threading.Event(), threading.Event()
fd = None

def register():  # what open_kept() does, with a fork requested in the middle of it
    global fd
    with kernel._inherited.lock:
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
        opened.set()
        # A fork must wait for this registration, so it cannot come now: the bounded wait
        # runs out. Without the fork gate the fork happens here, with the fd unregistered.
        forked.wait(2)
        kernel._inherited.fds.add(fd)

thread = threading.Thread(target=register)
thread.start()
opened.wait(30)
pid = os.fork()
if pid == 0:
    try:
        os.fstat(fd)
    except OSError:
        inherited = False
    else:
        inherited = True
    lock = kernel.kernel_lock(Path(sys.argv[1] + ".lock"))
    os._exit(3 if inherited else (0 if lock.try_lock() else 1))
forked.set()
thread.join(30)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_a_fork_during_a_registration_waits_and_the_child_holds_no_copy(
    processes: Processes, tmp_path: Path
) -> None:
    # 3: the child kept a descriptor opened before the fork (it would keep a lock alive);
    # 1: the child could not take a lock of its own (a registry lock held for ever).
    proc = processes.python(FORK_DURING_REGISTRATION, str(tmp_path / "file"))
    assert proc.wait() == 0, proc.output()
    assert "child exit 0" in proc.output()
