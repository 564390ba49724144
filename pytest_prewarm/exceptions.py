"""Error and warning types; each pickles, because errors cross xdist process boundaries."""

from __future__ import annotations

import pytest


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

    def _text(self) -> str:
        return (
            f"building template {self.template!r} failed in {self.worker} (pid {self.pid}): "
            f"{self.exc_type}: {self.exc_message}\n"
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


class PrewarmTimeout(PrewarmError):
    """Waiting for a template's lock took longer than the configured timeout."""

    def __init__(self, message: str, template: str, lock_path: str, waited: float) -> None:
        self.template = template
        self.lock_path = lock_path
        self.waited = waited
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.template, self.lock_path, self.waited))


class PrewarmUsageError(PrewarmError, ValueError):
    """A template was requested with invalid arguments (bad name, no builder, bad value)."""


class PrewarmLockError(PrewarmError):
    """The lock directory cannot provide mutual exclusion (for example flock is missing)."""


class PrewarmWarning(pytest.PytestWarning):
    """Base class of warnings issued by pytest-prewarm."""
