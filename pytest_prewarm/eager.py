"""Eager builds: the templates that selected tests' markers name, built in a background thread.

Each process walks the list starting at a different template, so K workers and K
templates take one each on the first try instead of all contending for the first; a
template whose lock is taken is skipped, not waited for (its tests wait when they run).
"""

from __future__ import annotations

import threading

from . import clock, console
from .request import Request, TemplateStore

NOTICE_EVERY = 5.0  # seconds between "still waiting for the eager build" lines


def worker_index(worker: str) -> int:
    """0 for "gw0" (and for the controller or anything unnumbered), 3 for "gw3"."""
    digits = worker.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


class EagerBuilds:
    """The background walk of one process, and the bounded wait for it at session end."""

    def __init__(self, store: TemplateStore, requests: list[Request]) -> None:
        self.store = store
        offset = worker_index(store.worker) % len(requests)
        self.requests = requests[offset:] + requests[:offset]
        self.current: str | None = None
        self.thread = threading.Thread(target=self._build_all, name="prewarm-eager", daemon=True)

    def start(self) -> EagerBuilds:
        self.thread.start()
        return self

    def _build_all(self) -> None:
        for req in self.requests:
            self.current = req.name
            try:
                self.store.build_if_free(req)
            except Exception as exc:
                console.emit(
                    f"[prewarm] eager build of {req.name!r} in {self.store.worker} failed: {exc}"
                )
        self.current = None

    def finish(self, timeout: float, *, interrupted: bool) -> None:
        """Wait for a build in progress, at most ``timeout`` s, saying what it waits for.

        After Ctrl-C (``interrupted``), or on a Ctrl-C during this wait, the build is
        abandoned at once: the thread is a daemon, so the process exits, the kernel (or
        the lease's liveness check) frees the lock, and the next holder sweeps the staging.
        """
        if not self.thread.is_alive():
            return
        if interrupted:
            self._say("abandoning", "the run was interrupted; the next holder builds it")
            return
        start = clock.monotonic()
        next_notice = start + NOTICE_EVERY
        try:
            while self.thread.is_alive():
                now = clock.monotonic()
                if now - start >= timeout:
                    self._say("gave up waiting for", f"{timeout:g} s, the timeout, passed")
                    return
                self.thread.join(min(0.2, timeout - (now - start)))
                # The build may have ended during the join: then there is nothing to say.
                if self.thread.is_alive() and clock.monotonic() >= next_notice:
                    next_notice += NOTICE_EVERY
                    waited = clock.monotonic() - start
                    self._say(
                        "is waiting for",
                        f"{waited:.0f} s of at most {timeout:g} s; Ctrl-C abandons it",
                    )
        except KeyboardInterrupt:
            self._say("abandoning", "interrupted while waiting for it")

    def _say(self, verb: str, why: str) -> None:
        console.emit(
            f"[prewarm] {self.store.worker} {verb} its eager build of {self.current!r} ({why})"
        )
