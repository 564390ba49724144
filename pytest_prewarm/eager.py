"""Eager builds: the templates that selected tests' markers name, built in a background thread.

Each process walks the list starting at a different template, so K workers and K
templates take one each on the first try instead of all contending for the first; a
template whose lock is taken is skipped, not waited for (its tests wait when they run).
"""

from __future__ import annotations

import threading

from . import console
from .request import Request, TemplateStore


def worker_index(worker: str) -> int:
    """0 for "gw0" (and for the controller or anything unnumbered), 3 for "gw3"."""
    digits = worker.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def start(store: TemplateStore, requests: list[Request]) -> threading.Thread:
    """Start building ``requests`` in a daemon thread; a failure waits for its tests."""
    offset = worker_index(store.worker) % len(requests)
    ordered = requests[offset:] + requests[:offset]
    thread = threading.Thread(
        target=_build_all, args=(store, ordered), name="prewarm-eager", daemon=True
    )
    thread.start()
    return thread


def _build_all(store: TemplateStore, requests: list[Request]) -> None:
    for req in requests:
        try:
            store.build_if_free(req)
        except Exception as exc:
            console.emit(f"[prewarm] eager build of {req.name!r} in {store.worker} failed: {exc}")
