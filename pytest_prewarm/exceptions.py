"""Error types and the one message of each error kind; each pickles across xdist processes.

No pytest import: the core raises these, and only the pytest edge turns configuration
errors into ``pytest.UsageError``.
"""

from __future__ import annotations

import errno
import os


class PrewarmError(Exception):
    """Base class of every error raised by pytest-prewarm."""


# Stands for the staging directory a failed build was given: it is discarded after the
# failure, so no message names it.
BUILD_DIR_MARK = "<build dir>"


class PrewarmBuildError(PrewarmError):
    """A template's builder raised; every user of that template in the run gets this error.

    It carries the builder's exception type, message and formatted traceback, the tail of
    what the build wrote (``output``) and of a failed subprocess's ``command_stderr`` and
    ``command_stdout``, the path of the log that keeps all of it (``log_path``), and the
    worker that ran the build, so a waiter in another process says what went wrong
    without re-running the build. Its message is the same in every process.
    """

    def __init__(
        self,
        template: str,
        exc_type: str,
        exc_message: str,
        traceback_text: str,
        worker: str,
        pid: int,
        output: str = "",
        command_stderr: str = "",
        command_stdout: str = "",
        log_path: str | None = None,
    ) -> None:
        self.template = template
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback_text = traceback_text
        self.worker = worker
        self.pid = pid
        self.output = output
        self.command_stderr = command_stderr
        self.command_stdout = command_stdout
        self.log_path = log_path
        super().__init__(self._text())

    @property
    def cause(self) -> str:
        """``Type: message`` of the builder's exception, as reports show it."""
        return f"{self.exc_type}: {self.exc_message}"

    def _text(self) -> str:
        first = (
            f"building template {self.template!r} failed in {self.worker} (pid {self.pid}): "
            f"{self.cause}"
        )
        parts = [self.traceback_text.rstrip("\n")] if self.traceback_text.strip() else []
        for title, text in (
            ("stderr of the failed command:", self.command_stderr),
            ("stdout of the failed command:", self.command_stdout),
            ("What the build wrote to stdout and stderr:", self.output),
        ):
            if text.strip():
                parts.append(title + "".join(f"\n  {line}" for line in text.splitlines()))
        if not parts:
            return first  # nothing more to say (a value that is not JSON): one line
        if any(BUILD_DIR_MARK in part for part in [self.exc_message, *parts]):
            parts.append(
                f"{BUILD_DIR_MARK} is the directory the builder was given; it was discarded."
            )
        last = "The build is attempted once per run; fix the builder and run again."
        if self.log_path:
            last += f" Full log: {self.log_path}"
        return "\n".join([first, *parts, last])

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (
                self.template,
                self.exc_type,
                self.exc_message,
                self.traceback_text,
                self.worker,
                self.pid,
                self.output,
                self.command_stderr,
                self.command_stdout,
                self.log_path,
            ),
        )


# Errors that mean "no room left": no space, or the user's quota exhausted.
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def timeout_hint(seconds: float, source: str, takeover: str | None = None) -> str:
    """What to try after a timeout; ``source`` says where the timeout came from.

    ``takeover``: what stopping the holder would do, where that is not "taken over at
    once" (a lease holder whose liveness is unknown waits out the stale window first).
    """
    takeover = takeover or "a killed holder's lock is taken over at once"
    return (
        f"The timeout is {seconds:g} s (from {source}). If the holder is working, raise "
        "it (--prewarm-timeout / prewarm_timeout, or timeout= in the call); if it is "
        f"stuck, look at that process (py-spy dump --pid PID) or stop it: {takeover}."
    )


class PrewarmTimeout(PrewarmError):
    """Waiting for a template's lock took longer than the configured timeout."""

    def __init__(self, message: str, template: str, lock_path: str, waited: float) -> None:
        self.template = template
        self.lock_path = lock_path
        self.waited = waited
        super().__init__(message)

    @classmethod
    def waiting_for(
        cls, template: str, lock_path: str, waited: float, whom: str, hint: str
    ) -> PrewarmTimeout:
        """The one timeout message: what was waited on, for how long, who held it, what next."""
        return cls(
            f"timed out after {waited:.1f} s waiting for template {template!r} "
            f"(lock {lock_path}); {whom}. {hint}",
            template,
            lock_path,
            waited,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.template, self.lock_path, self.waited))


class PrewarmUsageError(PrewarmError, ValueError):
    """A template was requested with invalid arguments (bad name, no builder, bad value)."""


class PrewarmLockError(PrewarmError):
    """The lock directory cannot provide mutual exclusion (for example flock is missing)."""

    @classmethod
    def lock_dir_failed(
        cls, template: str, lock_dir: os.PathLike[str], exc: OSError
    ) -> PrewarmLockError:
        """The one message for a filesystem error in the lock dir outside the builder."""
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in DISK_FULL:
            return cls(
                f"template {template!r}: the filesystem holding the lock dir "
                f"{os.fspath(lock_dir)} is full ({exc.strerror}{where}); free space there and "
                "run again"
            )
        return cls(
            f"template {template!r}: the lock dir {os.fspath(lock_dir)} failed: "
            f"{exc.strerror or exc}{where}. Check that it exists and is writable, or use "
            "another --prewarm-lock-dir"
        )

    @classmethod
    def lease_lost(cls, template: str, why: str, what: str) -> PrewarmLockError:
        """The one message for a holder whose lease was taken over while it built."""
        return cls(
            f"template {template!r}: lost the lease while building ({why}); the build was "
            f"{what}. Raise --prewarm-stale-after if builds stall for longer than it."
        )


class PrewarmConfigureError(PrewarmError):
    """A template's ``configure`` hook raised in this process (chained to what it raised)."""

    def __init__(self, template: str, worker: str, exc: BaseException) -> None:
        super().__init__(
            f"configure hook of template {template!r} failed in {worker}: "
            f"{type(exc).__name__}: {exc}. The template itself is fine; the hook runs once "
            "in every process that gets it, so this process's tests that need it fail."
        )
        self.template = template
        self.worker = worker

    def __reduce__(self) -> tuple[object, ...]:
        return (_configure_error, (self.args[0], self.template, self.worker))


def _configure_error(message: str, template: str, worker: str) -> PrewarmConfigureError:
    error = PrewarmConfigureError.__new__(PrewarmConfigureError)
    PrewarmError.__init__(error, message)
    error.template, error.worker = template, worker
    return error


class PrewarmWarning(UserWarning):
    """Something works now but will not for every user of the template (see the message)."""


class LockDirError(PrewarmError):
    """The lock dir is unusable; the message says why and what to do."""
