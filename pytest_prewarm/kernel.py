"""The platform's exclusive kernel lock on one file, and the descriptors a fork must drop.

Where ``fcntl`` exists (and the portable path is not forced) the lock is a raw
``flock(LOCK_EX | LOCK_NB)``. Elsewhere (Windows: ``msvcrt.locking``) it is filelock's
lock for the platform, with the soft fallback disabled: a lock that silently stops
excluding is worse than an error. Forcing the portable path on Linux takes the filelock
side too, so CI runs it.

Why not filelock everywhere: importing it costs 15 ms of CPU per process (about twenty
modules), paid by every worker on its first request, before the builder can take the lock.
With eight workers on two cores that was 60 ms of wall time before any build started.

What filelock did for us that a raw flock must do itself (../shared/design/facts.md):
- flock follows the open file description, so a ``fork()``ed child that kept a held
  descriptor would keep the lock after its parent died. Every descriptor we hold is
  closed in a forked child (closed, never unlocked: unlocking would drop the parent's
  lock), and opened close-on-exec, so an exec'd child never has it.
- The file is opened without following links and without blocking (a FIFO planted at its
  name must not hang the open), and must be a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from . import portable
from .files import O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK

if TYPE_CHECKING:
    from filelock import BaseFileLock

# flock's answers to a lock held by someone else; some filesystems say EACCES.
_CONTENDED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


class KernelLock(Protocol):
    def try_lock(self) -> bool:
        """Take the lock without blocking: False if another holds it.

        Raises OSError or NotImplementedError where the filesystem refuses the lock.
        """

    def unlock(self) -> None: ...


def available() -> bool:
    """Whether this platform has an exclusive kernel lock (filelock's soft one does not count)."""
    return portable.fcntl_module() is not None or _filelock_class() is not None


def kernel_lock(path: Path) -> KernelLock | None:
    """An exclusive lock on ``path`` (created if missing), or None where there is none."""
    fcntl = portable.fcntl_module()
    if fcntl is not None:
        return _Flock(path, fcntl)
    lock_class = _filelock_class()
    if lock_class is None:
        return None
    return _PlatformLock(
        lock_class(
            str(path), mode=0o600, thread_local=False, blocking=False, fallback_to_soft=False
        )
    )


def warm_up(path: Path) -> None:
    """Pay now for what a takeover would pay later; called once a wait begins.

    filelock imports parts of itself on first use, and a failed attempt does not load what
    a successful one needs; taking and dropping a private lock once loads all of it
    (measured: 2.4 ms off a takeover). A raw flock has nothing to load.
    """
    if portable.fcntl_module() is not None:
        return
    lock = kernel_lock(path)  # a private file of the caller's
    if lock is not None:
        with contextlib.suppress(Exception):
            if lock.try_lock():
                lock.unlock()


def _filelock_class() -> type[BaseFileLock] | None:
    import filelock  # only where there is no fcntl, or the portable path is forced

    if os.name == "nt":  # pragma: no cover - not run on Linux CI
        return filelock.WindowsFileLock
    return filelock.UnixFileLock if filelock.has_fcntl else None


# -- descriptors a forked child must close ---------------------------------------------------


class _Inherited:
    """Descriptors of this process that a forked child must close.

    A fork waits for the lock (``before``), so no thread can fork between opening a
    descriptor and registering it: a child with an unregistered copy of a locked
    descriptor would keep the lock after its parent died.
    """

    def __init__(self) -> None:
        self.fds: set[int] = set()
        self.lock = threading.Lock()

    def before_fork(self) -> None:
        self.lock.acquire()

    def after_fork_in_parent(self) -> None:
        self.lock.release()

    def close_in_child(self) -> None:
        self.lock = threading.Lock()  # the parent's copy was held across the fork
        for fd in list(self.fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


_inherited = _Inherited()


def open_kept(path: Path, flags: int) -> int:
    """``os.open`` (close-on-exec, mode 0o600 if created), closed in every forked child.

    Opened and registered under the fork lock: never inherited by a fork in between.
    """
    with _inherited.lock:
        fd = os.open(path, flags | O_CLOEXEC, 0o600)
        _inherited.fds.add(fd)
    return fd


def forget(fd: int) -> bool:
    """Stop tracking ``fd``; False if it was not tracked (someone closed it already)."""
    with _inherited.lock:
        if fd not in _inherited.fds:
            return False
        _inherited.fds.discard(fd)
        return True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_inherited.before_fork,
        after_in_parent=_inherited.after_fork_in_parent,
        after_in_child=_inherited.close_in_child,
    )


# -- the two implementations -------------------------------------------------------------------


class _Flock:
    def __init__(self, path: Path, fcntl: ModuleType) -> None:
        self.path = path
        self._fcntl = fcntl
        self._fd: int | None = None

    def try_lock(self) -> bool:
        if self._fd is not None:  # an attempt interrupted right after its flock: let it go
            self.unlock()
        self._fd = fd = open_kept(self.path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{self.path} is not a regular file")
            self._fcntl.flock(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except BaseException as exc:  # a signal's exception (a test timeout) included
            self._fd = None
            forget(fd)
            os.close(fd)
            if isinstance(exc, OSError) and exc.errno in _CONTENDED:
                return False
            raise
        return True

    def unlock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None or not forget(fd):
            return  # not held, or this is a forked child that closed its inherited copy
        try:
            self._fcntl.flock(fd, self._fcntl.LOCK_UN)
        finally:
            os.close(fd)


class _PlatformLock:
    def __init__(self, lock: BaseFileLock) -> None:
        self._lock = lock

    def try_lock(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            return False
        return True

    def unlock(self) -> None:
        self._lock.release(force=True)
