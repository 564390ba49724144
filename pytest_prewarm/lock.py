"""The cross-process lock of one template, its owner record, and the bounded wait for it.

Mutual exclusion comes from an exclusive flock, taken through filelock with the soft
fallback disabled: a lock that silently stops excluding is worse than an error.

Waking waiters fast without burning CPU: a waiter parks a daemon thread in a *blocking*
``flock(LOCK_SH)`` on the same lock file. The kernel grants it the moment the holder
releases or dies (SIGKILL included, zombie or not), so waiters wake within a millisecond
instead of a poll interval, and use no CPU while a long build runs. The main thread only
waits on an Event with a timeout, so every wait stays bounded without signals (SIGALRM
would collide with pytest-timeout). The lock file itself is permanent and never written:
deleting it would let two processes lock two different inodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from filelock import UnixFileLock


from . import clock
from .exceptions import PrewarmLockError, PrewarmTimeout
from .liveness import Liveness, Verdict, classify, held_for, local_host, prepare_classify
from .owner import OwnerRecord, read_record, write_atomic

T = TypeVar("T")

# Descriptors of parked release-watcher threads. A forked child inherits them without the
# threads that would close them, so the child closes them at once.
_watch_fds: set[int] = set()
_watch_fds_lock = threading.Lock()


def _close_watch_fds_in_child() -> None:
    for fd in list(_watch_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _watch_fds.clear()


os.register_at_fork(after_in_child=_close_watch_fds_in_child)


class _ReleaseWatch:
    """One-shot: fires when the exclusive holder of ``path`` releases (or dies)."""

    def __init__(self, path: Path) -> None:
        # os.open makes descriptors non-inheritable (O_CLOEXEC) by default.
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with _watch_fds_lock:
            _watch_fds.add(self._fd)
        self.fired = threading.Event()
        self.started = clock.monotonic()
        thread = threading.Thread(target=self._run, name=f"prewarm-watch:{path.name}")
        thread.daemon = True  # an abandoned watch must never keep the interpreter alive
        thread.start()

    def _run(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # blocks in the kernel, GIL released
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # we only wanted to know it was free
        except OSError:
            pass  # fire anyway: the caller re-checks the state and retries
        finally:
            with _watch_fds_lock:
                if self._fd in _watch_fds:
                    _watch_fds.discard(self._fd)
                    os.close(self._fd)
            self.fired.set()


@dataclass(frozen=True)
class Holder:
    """What a waiter knows of the current holder, for messages and the report."""

    record: OwnerRecord | None
    verdict: Verdict

    def describe(self) -> str:
        if self.record is None:
            return f"no identifiable holder ({self.verdict.reason})"
        here = local_host().hostname
        return (
            f"held by {self.record.describe(local_hostname=here)}, {self.verdict}, "
            f"{held_for(self.record):.0f} s"
        )


@dataclass(frozen=True)
class Acquired:
    """The lock is ours. ``previous`` is the record of whoever held it before us."""

    previous: OwnerRecord | None
    previous_verdict: Verdict | None

    @property
    def took_over(self) -> bool:
        """True when the previous holder stopped without releasing: it died mid-build."""
        return self.previous is not None and self.previous.state == "held"


class FlockLock:
    """Exclusive lock of one template plus the owner record beside it."""

    def __init__(
        self,
        lock_path: Path,
        owner_path: Path,
        template: str,
        finished_by: Callable[[OwnerRecord], bool] | None = None,
    ) -> None:
        # finished_by(record) tells whether that holder published the template: a holder
        # that published releases without rewriting its record, which keeps a file
        # replacement (0.5 ms on ext4) off every waiter's wake-up.
        self.finished_by = finished_by
        self.lock_path = lock_path
        self.owner_path = owner_path
        self.template = template
        self._held: UnixFileLock | None = None
        self._record: OwnerRecord | None = None
        self._watch: _ReleaseWatch | None = None
        self._quick_fires = 0
        self._lock_object: UnixFileLock | None = None

    def holder(self) -> Holder:
        record = read_record(self.owner_path)
        return Holder(record, classify(record))

    def _filelock(self) -> UnixFileLock:
        # One object for all attempts: construction costs about 0.1 ms, paid on a takeover.
        if self._lock_object is None:
            from filelock import UnixFileLock  # on first use, like psutil in liveness.py

            self._lock_object = UnixFileLock(
                str(self.lock_path),
                mode=0o600,
                thread_local=False,
                blocking=False,
                fallback_to_soft=False,
            )
        return self._lock_object

    def prepare(self) -> None:
        """Called once a wait begins: pay now for what a takeover would otherwise pay.

        filelock imports parts of itself on first use, and a failed attempt does not
        load what a successful one needs; taking and dropping a private lock once loads
        all of it (measured: 2.4 ms off the takeover).
        """
        prepare_classify()
        from filelock import UnixFileLock

        probe = UnixFileLock(
            str(self.lock_path.parent / ".warm-up.lock"),
            mode=0o600,
            thread_local=False,
            fallback_to_soft=False,
        )
        with contextlib.suppress(Exception):
            probe.acquire(timeout=0)
            probe.release(force=True)

    def _prepare_record(self, record: OwnerRecord) -> str:
        # Written before we try the lock, so taking the lock and naming ourselves is one
        # rename apart: no reader finds the lock held and the record missing or half-written.
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.owner_path.name}.", suffix=".tmp", dir=self.owner_path.parent
        )
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(record.to_json())
        return tmp

    def try_acquire(self, record: OwnerRecord) -> Acquired | None:
        """Take the lock without blocking; ``None`` if someone else holds it."""
        tmp = self._prepare_record(record)
        from filelock import Timeout as FileLockTimeout

        lock = self._filelock()
        try:
            lock.acquire(blocking=False)
        except FileLockTimeout:
            os.unlink(tmp)
            return None
        except (OSError, NotImplementedError) as exc:
            os.unlink(tmp)
            raise PrewarmLockError(
                f"cannot lock {self.lock_path} for template {self.template!r}: {exc}. "
                "The lock dir's filesystem does not support flock; use "
                "--prewarm-lock-mode lease, or put --prewarm-lock-dir on a local filesystem."
            ) from exc
        previous = read_record(self.owner_path)
        verdict = None
        if (
            previous is not None
            and previous.state == "held"
            and self.finished_by is not None
            and self.finished_by(previous)
        ):
            previous = previous.released()
        if previous is not None and previous.state == "held":
            verdict = classify(previous) if _is_self(previous) else _settled_verdict(previous)
            if verdict.state is Liveness.ALIVE and not _is_self(previous):
                # The kernel gave us the lock while a live process says it still holds it:
                # flock does not exclude on this filesystem (NFS caches, VirtioFS). Building
                # now would race, so stop loudly, leaving the holder's record untouched.
                os.unlink(tmp)
                lock.release(force=True)
                raise PrewarmLockError(
                    f"flock on {self.lock_path} did not exclude: it was granted to pid "
                    f"{record.pid} while {previous.describe(local_hostname=local_host().hostname)} "
                    f"still holds it ({verdict}). "
                    "The lock dir's filesystem does not provide working flock; use "
                    "--prewarm-lock-mode lease, or put --prewarm-lock-dir on a local "
                    "filesystem."
                )
        os.replace(tmp, self.owner_path)
        self._held, self._record = lock, record
        return Acquired(previous, verdict)

    def held_by(self) -> OwnerRecord | None:
        return self._record

    def release(self, *, published: bool = False) -> None:
        lock, record = self._held, self._record
        if lock is None or record is None:
            return
        try:
            # Say "released" before unlocking, so the next holder can tell a clean release
            # from a holder that died with the lock. A published template says it already.
            if not published:
                write_atomic(self.owner_path, record.released().to_json())
        finally:
            self._held = self._record = None
            lock.release(force=True)

    def wait_for_change(self, until: float) -> None:
        """Block until the holder may have released (or ``until``, a monotonic time)."""
        if self._watch is None:
            self._watch = _ReleaseWatch(self.lock_path)
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

    def lost(self) -> str | None:
        return None  # the kernel never takes a flock away from a live holder


class Lock(Protocol):
    """What the wait loop needs of a lock: flock (lock.py) and lease (lease.py) both fit."""

    template: str
    lock_path: Path

    def try_acquire(self, record: OwnerRecord) -> Acquired | None: ...
    def prepare(self) -> None: ...
    def held_by(self) -> OwnerRecord | None: ...
    def release(self, *, published: bool = False) -> None: ...
    def holder(self) -> Holder: ...
    def wait_for_change(self, until: float) -> None: ...
    def stop_waiting(self) -> None: ...
    def lost(self) -> str | None: ...


def acquire_or_wait(
    lock: Lock,
    is_done: Callable[[], T | None],
    make_record: Callable[[], OwnerRecord],
    *,
    timeout: float,
    timeout_hint: str,
    notice_every: float,
    on_notice: Callable[[float, Holder], None] | None = None,
) -> tuple[T | None, Acquired | None, float]:
    """Return ``(done, None, waited)`` once ``is_done`` answers, or ``(None, acquired,
    waited)`` once the lock is ours and the work is still to do.

    Raises PrewarmTimeout after ``timeout`` seconds, naming the holder.
    """
    __tracebackhide__ = True  # users need the builder's frames, not ours
    start = clock.monotonic()
    deadline = start + timeout
    next_notice = start + notice_every
    warmed = False
    try:
        while True:
            done = is_done()
            if done is not None:
                return done, None, clock.monotonic() - start
            acquired = lock.try_acquire(make_record())
            if acquired is not None:
                # Someone may have finished between our check and our lock: check again.
                done = is_done()
                if done is not None:
                    lock.release()
                    return done, None, clock.monotonic() - start
                return None, acquired, clock.monotonic() - start
            now = clock.monotonic()
            if now >= deadline:
                holder = lock.holder()
                raise PrewarmTimeout(
                    f"timed out after {now - start:.1f} s waiting for template "
                    f"{lock.template!r} (lock {lock.lock_path}); {holder.describe()}. "
                    f"{timeout_hint}",
                    lock.template,
                    str(lock.lock_path),
                    now - start,
                )
            if not warmed:
                lock.prepare()  # waiting is the time to pay for what a takeover needs
                warmed = True
            lock.wait_for_change(min(deadline, next_notice))
            if clock.monotonic() >= next_notice:
                next_notice += notice_every
                if on_notice is not None:
                    on_notice(clock.monotonic() - start, lock.holder())
    finally:
        lock.stop_waiting()


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
