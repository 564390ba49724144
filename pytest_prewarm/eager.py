"""Eager builds: the templates that selected tests' markers name, built in background threads.

Each process walks the list starting at its own share of it (worker ``gwN`` of W at
template N * ceil(K / W)), so W workers and K templates take their shares on the first try
instead of all contending for the first; a template whose lock is taken is skipped, not
waited for (its tests wait when they run). A process builds its share side by side, in up
to ``threads`` threads: builds mostly wait on subprocesses, downloads and servers, and K
templates built one after another in each worker took about K / W builds' time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

from . import clock, console
from .request import Request, TemplateStore

NOTICE_EVERY = 5.0  # seconds between "still waiting for the eager build" lines
MAX_AUTO_THREADS = 16  # "auto" builds a worker's whole share at once, up to this many


def worker_index(worker: str) -> int:
    """0 for "gw0" (and for the controller or anything unnumbered), 3 for "gw3"."""
    digits = worker.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def share(templates: int, workers: int) -> int:
    """How many templates each process builds: ceil(K / W), the first try's share."""
    return math.ceil(templates / max(workers, 1))


def thread_count(templates: int, workers: int, threads: int | None) -> int:
    """How many threads build side by side in one process: ``threads``, or with None
    ("auto") the process's share of the templates, at most MAX_AUTO_THREADS."""
    wanted = min(share(templates, workers), MAX_AUTO_THREADS) if threads is None else threads
    return max(1, min(wanted, templates))


class EagerBuilds:
    """The background walk of one process, and the bounded wait for it at session end."""

    def __init__(
        self,
        store: TemplateStore,
        requests: list[Request],
        *,
        workers: int = 1,
        threads: int | None = None,
    ) -> None:
        self.store = store
        offset = (worker_index(store.worker) * share(len(requests), workers)) % len(requests)
        self.requests = requests[offset:] + requests[:offset]
        self._pending: Iterator[Request] = iter(self.requests)
        self._lock = threading.Lock()
        self.building: list[str] = []  # in walk order, for the messages at the end
        count = thread_count(len(requests), workers, threads)
        self.threads = [
            threading.Thread(target=self._build_all, name=_name(n), daemon=True)
            for n in range(count)
        ]

    def start(self) -> EagerBuilds:
        for thread in self.threads:
            thread.start()
        return self

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def _next(self) -> Request | None:
        with self._lock:
            req = next(self._pending, None)
            if req is not None:
                self.building.append(req.name)
            return req

    def _build_all(self) -> None:
        while (req := self._next()) is not None:
            try:
                self.store.build_if_free(req)
            except Exception as exc:
                console.emit(
                    f"[prewarm] eager build of {req.name!r} in {self.store.worker} failed: {exc}"
                )
            finally:
                with self._lock:
                    self.building.remove(req.name)

    def finish(self, timeout: float, *, interrupted: bool) -> None:
        """Wait for the builds in progress, at most ``timeout`` s, saying what it waits for.

        After Ctrl-C (``interrupted``), or on a Ctrl-C during this wait, the builds are
        abandoned at once: the threads are daemons, so the process exits, the kernel (or
        the lease's liveness check) frees the locks, and the next holder sweeps the staging.
        """
        if not self.alive():
            return
        if interrupted:
            self._say("abandoning", "the run was interrupted; the next holder builds it")
            return
        start = clock.monotonic()
        next_notice = start + NOTICE_EVERY
        try:
            for thread in self.threads:
                while thread.is_alive():
                    now = clock.monotonic()
                    if now - start >= timeout:
                        self._say("gave up waiting for", f"{timeout:g} s, the timeout, passed")
                        return
                    thread.join(min(0.2, timeout - (now - start)))
                    # A build may have ended during the join: then there is nothing to say.
                    if self.alive() and clock.monotonic() >= next_notice:
                        next_notice += NOTICE_EVERY
                        waited = clock.monotonic() - start
                        self._say(
                            "is waiting for",
                            f"{waited:.0f} s of at most {timeout:g} s; Ctrl-C abandons it",
                        )
        except KeyboardInterrupt:
            self._say("abandoning", "interrupted while waiting for it")

    def _say(self, verb: str, why: str) -> None:
        with self._lock:
            names = list(self.building)
        if not names:
            return  # every build ended meanwhile
        what = ("eager build of " if len(names) == 1 else "eager builds of ") + ", ".join(
            map(repr, names)
        )
        console.emit(f"[prewarm] {self.store.worker} {verb} its {what} ({why})")


def _name(index: int) -> str:
    return "prewarm-eager" if index == 0 else f"prewarm-eager-{index + 1}"
