"""Error types and the one message of each error kind; each pickles across xdist processes.

No pytest import: the core raises these, and only the pytest edge turns configuration
errors into ``pytest.UsageError``.
"""

from __future__ import annotations


class PrewarmError(Exception):
    """Base class of every error raised by pytest-prewarm."""


class PrewarmBuildError(PrewarmError):
    """A template's builder raised; every user of that template in the run gets this error.

    It carries the builder's exception type, message and formatted traceback, and the
    worker that ran the build, so a waiter in another process can say what went wrong
    without re-running the build.
    """

    def __init__(
        self,
        template: str,
        exc_type: str,
        exc_message: str,
        traceback_text: str,
        worker: str,
        pid: int,
    ) -> None:
        self.template = template
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback_text = traceback_text
        self.worker = worker
        self.pid = pid
        super().__init__(self._text())

    @property
    def cause(self) -> str:
        """``Type: message`` of the builder's exception, as reports show it."""
        return f"{self.exc_type}: {self.exc_message}"

    def _text(self) -> str:
        return (
            f"building template {self.template!r} failed in {self.worker} (pid {self.pid}): "
            f"{self.cause}\n"
            "The build is attempted once per run; fix the builder and run again.\n"
            f"Builder traceback:\n{self.traceback_text}"
        )

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
            ),
        )


def timeout_hint(seconds: float, source: str) -> str:
    """What to try after a timeout; ``source`` says where the timeout came from."""
    return (
        f"The timeout is {seconds:g} s (from {source}). If the holder is working, raise "
        "it (--prewarm-timeout / prewarm_timeout, or timeout= in the call); if it is "
        "stuck, look at that process (py-spy dump --pid PID) or stop it: a killed "
        "holder's lock is taken over at once."
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
    def lease_lost(cls, template: str, why: str, what: str) -> PrewarmLockError:
        """The one message for a holder whose lease was taken over while it built."""
        return cls(
            f"template {template!r}: lost the lease while building ({why}); the build was "
            f"{what}. Raise --prewarm-stale-after if builds stall for longer than it."
        )


class LockDirError(PrewarmError):
    """The lock dir is unusable; the message says why and what to do."""
