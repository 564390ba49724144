"""flock mode: a template's lock is a kernel lock on a permanent file, plus an owner record.

Mutual exclusion comes from the platform's kernel file lock (kernel.py: ``flock`` on Unix,
filelock's ``msvcrt.locking`` on Windows). The kernel drops it the moment its holder dies,
SIGKILL included, zombie or not.

Waking waiters fast without burning CPU: where ``fcntl`` exists, a waiter parks a daemon
thread in a *blocking* ``flock(LOCK_SH)`` on the same lock file. The kernel grants it the
moment the holder releases or dies, so waiters wake within a millisecond instead of a poll
interval, and use no CPU while a long build runs. The main thread only waits on an Event
with a timeout, so every wait stays bounded without signals (SIGALRM would collide with
pytest-timeout). Without ``fcntl`` (Windows, or forced with PYTEST_PREWARM_PORTABLE=1)
waiters poll every ``POLL_INTERVAL`` instead, since msvcrt has no shared mode to block on.

The lock file itself is permanent and never written: deleting it would let two processes
lock two different inodes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

from . import clock, kernel, portable
from .exceptions import PrewarmLockError
from .files import O_NOFOLLOW, O_NONBLOCK, write_atomic, write_temp
from .fstype import filesystem_type, flock_untrusted
from .layout import Layout
from .liveness import Liveness, Verdict, classify, local_host, prepare_classify
from .locking import Acquired, Holder
from .owner import OwnerRecord, read_record
from .records import Meta, hold_id
from .trust import is_mine, kind_of, why_unreadable

# Why a lock file could not be made: the disk, not flock (the first request creates it).
_CANNOT_CREATE = {
    errno.ENOSPC: "free space (or inodes) on the lock dir's filesystem",
    errno.EDQUOT: "free space within your disk quota on the lock dir's filesystem",
    errno.EROFS: "put --prewarm-lock-dir on a writable filesystem",
}

# Seconds between a polling waiter's attempts where no blocking shared lock exists.
POLL_INTERVAL = 0.005


def probe(directory: Path) -> str | None:
    """Why a kernel lock cannot be taken in ``directory``, or None when it can.

    The probe locks a file of its own (a fresh temporary name), so concurrent runs probing
    the same fresh lock dir never meet each other: contention cannot pass for a missing
    feature.
    """
    if not kernel.available():  # before any file is made for the probe
        return "no kernel file lock on this platform (the fcntl module is missing)"
    fd, name = tempfile.mkstemp(prefix=".prewarm-flock-probe-", dir=directory)
    os.close(fd)
    probe_lock = kernel.kernel_lock(Path(name))
    assert probe_lock is not None  # available() said so
    try:
        if not probe_lock.try_lock():
            return "flock refused (a fresh private file read as locked)"
        probe_lock.unlock()
    except (OSError, NotImplementedError) as exc:
        return f"flock refused ({exc})"
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


class _ReleaseWatch:
    """One-shot: fires when the exclusive holder of ``path`` releases (or dies)."""

    def __init__(self, path: Path, fcntl: ModuleType) -> None:
        # Non-blocking open: a FIFO planted where the lock file was must not hang us here.
        # Closed in a forked child, which inherits it without the thread that would close
        # it (and with it, for a moment, a shared lock that would block every builder).
        self._fd = kernel.open_kept(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
        self._fcntl = fcntl
        self.fired = threading.Event()
        self.started = clock.monotonic()
        thread = threading.Thread(target=self._run, name=f"prewarm-watch:{path.name}")
        thread.daemon = True  # an abandoned watch must never keep the interpreter alive
        thread.start()

    def _run(self) -> None:
        try:
            self._fcntl.flock(self._fd, self._fcntl.LOCK_SH)  # blocks, GIL released
            self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)  # we only wanted to know
        except OSError:
            pass  # fire anyway: the caller re-checks the state and retries
        finally:
            if kernel.forget(self._fd):  # else a fork's child handler closed it
                os.close(self._fd)
            self.fired.set()


class FlockLock:
    """Exclusive kernel lock of one template plus the owner record beside it."""

    def __init__(self, layout: Layout, tid: str, template: str) -> None:
        self.layout = layout
        self.lock_path = layout.lock_file(tid)
        self.owner_path = layout.owner_file(tid)
        # A holder that published releases without rewriting its record (a file
        # replacement, 0.5 ms on ext4, kept off every waiter's wake-up); the template's
        # meta names the hold instead, so the next holder reads it there.
        self.finished_marker = layout.meta_file(tid)
        self.template = template
        self._held: kernel.KernelLock | None = None
        self._record: OwnerRecord | None = None
        self._watch: _ReleaseWatch | None = None
        self._quick_fires = 0
        self._warmed = False
        self._checked = False
        self._lock_object: kernel.KernelLock | None = None

    def holder(self) -> Holder:
        record = read_record(self.owner_path)
        if record is None:
            return Holder(None, Verdict(Liveness.UNKNOWN, why_unreadable(self.owner_path)))
        return Holder(record, classify(record))

    def _kernel_lock(self) -> kernel.KernelLock:
        # One object for all attempts: filelock's costs about 0.1 ms, paid on a takeover.
        if self._lock_object is None:
            self._lock_object = kernel.kernel_lock(self.lock_path)
            if self._lock_object is None:
                raise PrewarmLockError(
                    f"template {self.template!r}: flock mode needs a kernel file lock and "
                    "this platform has none (the fcntl module is missing); use "
                    "--prewarm-lock-mode lease (or auto, which picks it)"
                )
        return self._lock_object

    def _warm_up(self) -> None:
        """Called once a wait begins: pay now for what a takeover would otherwise pay."""
        prepare_classify()
        kernel.warm_up(self.layout.warm_up_lock())

    def _finished(self, record: OwnerRecord) -> bool:
        meta = Meta.read(self.finished_marker)
        return meta is not None and meta.holder == hold_id(record)

    def _check_lock_file(self) -> None:
        """A lock file must be a regular file of ours: never lock through a planted link."""
        try:
            info = os.lstat(self.lock_path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(info.st_mode) or not is_mine(info):
            what = (
                kind_of(info.st_mode) if not stat.S_ISREG(info.st_mode) else "another user's file"
            )
            raise PrewarmLockError(
                f"template {self.template!r}: the lock file {self.lock_path} is {what}, not a "
                "lock file pytest-prewarm made; nothing was locked or changed. Remove it "
                "(nothing else in the lock dir needs to go) and run again."
            )

    def try_acquire(self, record: OwnerRecord) -> Acquired | None:
        """Take the lock without blocking; ``None`` if someone else holds it."""
        lock = self._kernel_lock()
        if not self._checked:
            self._check_lock_file()
            self._checked = True
        # Written before we try the lock, so taking the lock and naming ourselves is one
        # rename apart: no reader finds the lock held and the record missing or half-written.
        tmp = write_temp(self.owner_path.parent, self.owner_path.name, record.to_json())
        try:
            taken = lock.try_lock()
        except (OSError, NotImplementedError) as exc:
            os.unlink(tmp)
            self._check_lock_file()  # a link or a FIFO planted since the first check
            if isinstance(exc, OSError) and exc.errno in _CANNOT_CREATE:
                raise PrewarmLockError(
                    f"cannot create the lock file {self.lock_path} for template "
                    f"{self.template!r}: {exc.strerror}. Nothing was locked or left behind; "
                    f"{_CANNOT_CREATE[exc.errno]} and run again."
                ) from exc
            raise PrewarmLockError(
                f"cannot lock {self.lock_path} for template {self.template!r}: {exc}. "
                "The lock dir's filesystem does not support flock; use "
                "--prewarm-lock-mode lease, or put --prewarm-lock-dir on a local filesystem."
            ) from exc
        if not taken:
            os.unlink(tmp)
            return None
        try:
            acquired = self._claim(record, tmp)
        except BaseException:
            # Nothing stays held after an error: not the lock, not the temporary record.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            lock.unlock()
            raise
        self._held, self._record = lock, record
        return acquired

    def _claim(self, record: OwnerRecord, tmp: Path) -> Acquired:
        """The kernel lock is ours: judge the previous holder, then name ourselves."""
        previous = read_record(self.owner_path)
        if previous is not None and previous.is_held and self._finished(previous):
            previous = previous.released()
        verdict = None
        if previous is not None and previous.is_held:
            verdict = classify(previous) if _is_self(previous) else _settled_verdict(previous)
            if verdict.state is Liveness.ALIVE and not _is_self(previous):
                verdict = self._live_previous(previous, record, verdict)
        try:
            os.replace(tmp, self.owner_path)
        except OSError as exc:
            try:
                kind = kind_of(os.lstat(self.owner_path).st_mode)
            except OSError:
                kind = "unusable"
            raise PrewarmLockError(
                f"template {self.template!r}: cannot write the owner record "
                f"{self.owner_path} ({exc.strerror}; it is {kind}). Remove it and run again; "
                "the lock was released."
            ) from exc
        return Acquired(previous, verdict)

    def _live_previous(
        self, previous: OwnerRecord, record: OwnerRecord, verdict: Verdict
    ) -> Verdict:
        """The kernel granted us the lock, yet the record names a live holder.

        On a local filesystem, where flock is known to exclude, the kernel is right: that
        process no longer holds the lock (it gave up without a clean release, or the record
        was planted), so the record is stale. Only where flock cannot be trusted (network
        and virtual filesystems) does this mean that flock did not exclude.
        """
        holder = previous.describe(local_hostname=local_host().hostname)
        if not flock_untrusted(filesystem_type(self.lock_path.parent)):
            return Verdict(
                Liveness.ALIVE,
                f"{verdict.reason}, but it does not hold the lock: the kernel granted it here",
            )
        raise PrewarmLockError(
            f"flock on {self.lock_path} did not exclude: it was granted to pid "
            f"{record.pid} while {holder} still holds it ({verdict}). "
            "The lock dir's filesystem does not provide working flock; use "
            "--prewarm-lock-mode lease, or put --prewarm-lock-dir on a local "
            "filesystem."
        )

    def held_by(self) -> OwnerRecord | None:
        return self._record

    def confirm_held(self, what: str) -> None:
        """The kernel never takes a flock away from a live holder: nothing to check."""

    def release(self, *, finished: bool = False) -> None:
        lock, record = self._held, self._record
        if lock is None or record is None:
            return
        try:
            # Say "released" before unlocking, so the next holder can tell a clean release
            # from a holder that died with the lock. A published template says it already.
            if not finished:
                # A record that cannot be written (a full disk) must not keep the lock held
                # or hide the error being handled; the next holder then reads "held" and
                # judges the holder, as after a crash.
                with contextlib.suppress(OSError):
                    write_atomic(self.owner_path, record.released().to_json())
        finally:
            self._held = self._record = None
            lock.unlock()

    def wait_for_change(self, until: float) -> None:
        """Block until the holder may have released (or ``until``, a monotonic time)."""
        if not self._warmed:
            self._warm_up()  # waiting is the time to pay for what a takeover needs
            self._warmed = True
        fcntl = portable.fcntl_module()
        if fcntl is None:
            delay = min(POLL_INTERVAL, until - clock.monotonic())
            if delay > 0:
                threading.Event().wait(delay)
            return
        if self._watch is None:
            self._watch = _ReleaseWatch(self.lock_path, fcntl)
        if self._watch.fired.wait(max(0.0, until - clock.monotonic())):
            # A watch granted at once means only other waiters' brief shared locks kept
            # our exclusive attempt out; back off a little so one of us gets through.
            quick = clock.monotonic() - self._watch.started < 0.002
            self._watch = None
            self._quick_fires = self._quick_fires + 1 if quick else 0
            if self._quick_fires > 1:
                time.sleep(random.uniform(0, 0.002 * min(self._quick_fires, 10)))

    def stop_waiting(self) -> None:
        # An unfired watch is abandoned: its thread closes its descriptor when the holder
        # releases, or the process exits first.
        self._watch = None
        self._quick_fires = 0


# How long a holder that lost its flock may still look alive before we call flock broken.
# A killed process releases its locks early in exit; it is normally a zombie within
# milliseconds, but a loaded machine can stretch that.
EXIT_GRACE = 1.0


def _settled_verdict(previous: OwnerRecord) -> Verdict:
    verdict = classify(previous)
    deadline = clock.monotonic() + EXIT_GRACE
    while verdict.state is Liveness.ALIVE and clock.monotonic() < deadline:
        time.sleep(0.002)  # polling a dying process's /proc entry; bounded by EXIT_GRACE
        verdict = classify(previous)
    return verdict


def _is_self(record: OwnerRecord) -> bool:
    return record.pid == os.getpid() and record.pid_ns == local_host().pid_ns
