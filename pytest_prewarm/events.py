"""What happened to each template in each process of a run: collected, persisted, merged.

Events travel from workers to the controller as dicts (xdist's workeroutput carries only
builtin types) and are also appended to a per-process file in the lock dir, so that a
worker that crashes still reports what it did. No pytest import: the plugin only hands
the log what xdist delivers.
"""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import json
import os
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

from . import console
from .files import append_text, decode_json_object, read_bounded
from .kinds import Outcome
from .layout import Layout
from .trust import make_dir

# A process's event file holds a few hundred bytes per template it asked for.
MAX_EVENTS_FILE = 16 * 1024 * 1024


class TemplateEvent(NamedTuple):
    """One request's outcome in one process; ``recovered_from`` names a dead predecessor."""

    template: str
    worker: str
    outcome: str  # an Outcome value
    wait_seconds: float = 0.0
    build_seconds: float | None = None
    built_by: str | None = None
    error: str | None = None
    recovered_from: str | None = None  # "gw2, pid 4100: dead, zombie"
    pid: int = 0
    note: str | None = None  # why it was built again, or how a restored one was verified
    key: str | None = None  # the canonical key it was asked with (keys.py lists them)

    def to_dict(self) -> dict[str, Any]:
        """Builtin types only: execnet carries nothing else between processes.

        Every field already is one, so no deep copy (``asdict``): a run with 10,000 waits
        turns them all into dicts for its JSON report.
        """
        data = dict(zip(_FIELDS, self, strict=True))
        data["outcome"] = str(self.outcome)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TemplateEvent":
        if data.keys() <= _FIELD_SET:  # the usual case, checked in C: no copy
            return cls(**data)
        return cls(**{name: data[name] for name in _FIELDS if name in data})


_FIELDS = TemplateEvent._fields
_FIELD_SET = frozenset(_FIELDS)


def parse_lines(text: str) -> list[TemplateEvent]:
    """Events of a JSONL file; a line torn by a kill mid-write (or garbage) is skipped."""
    events = []
    for line in text.splitlines():
        data = decode_json_object(line)
        if data is None:
            continue
        try:
            events.append(TemplateEvent.from_dict(data))
        except TypeError:
            continue  # a line missing required fields
    return events


class EventLog:
    """The events of one process, and on the controller, those of the whole run."""

    def __init__(self, layout: Layout, run_id: str, worker: str) -> None:
        self.layout = layout
        self.run_id = run_id
        self.worker = worker
        self.events: list[TemplateEvent] = []  # this process's, in order
        self._unflushed: list[TemplateEvent] = []
        self._flush_lock = threading.Lock()  # the eager thread and the main thread flush
        self._reported: list[TemplateEvent] = []
        self._reported_workers: set[str] = set()
        # Set at the first write that fails (a full disk, no inode left): this process
        # stops writing its events file, and its events stay in memory only.
        self.write_error: OSError | None = None

    def record(self, event: TemplateEvent) -> None:
        # A waiter's event is kept in memory until its test ends: writing it here would
        # lengthen every wake-up. A build's event is written at once (after the lock is
        # released), so that a builder killed in the same test still leaves it behind.
        self.events.append(event)
        self._unflushed.append(event)
        if event.outcome in (Outcome.BUILT, Outcome.FAILED):
            self.flush()

    def flush(self) -> None:
        """Append unflushed events to this process's file in the lock dir.

        Never raises OSError: the file is only a copy for the case that this process
        crashes (a worker that ends normally sends its events to the controller), so a
        disk that is full or out of inodes must not fail a test, let alone the run. The
        first failure stops the writing, says so once, and keeps the events in memory.
        """
        with self._flush_lock:
            if not self._unflushed:
                return
            events, self._unflushed = self._unflushed, []
            if self.write_error is not None:
                return  # stopped: the events are in self.events, for the report
            path = self.layout.events_file(self.run_id, self.worker, os.getpid())
            lines = "".join(json.dumps(e.to_dict()) + "\n" for e in events)
            try:
                make_dir(self.layout.events_dir(self.run_id))
                append_text(path, lines)
            except OSError as exc:
                self.write_error = exc
                console.emit(
                    f"[prewarm] {self.worker} stopped recording its template events in "
                    f"{path}: {exc.strerror or exc}. Should this process crash, the "
                    "summary and the --prewarm-json report lose its lock waits and build "
                    "times; free space (or inodes) on that filesystem, or choose another "
                    "--prewarm-lock-dir"
                )

    def add_reported(self, worker: str, dicts: Iterable[dict[str, Any]]) -> None:
        """A worker that ended normally sent these; its file on disk is then redundant."""
        self._reported_workers.add(worker)
        self._reported.extend(TemplateEvent.from_dict(d) for d in dicts)

    def merged(self) -> list[TemplateEvent]:
        """Own events, workers' reported events, and crashed workers' events from disk."""
        events = list(self.events) + self._reported
        try:
            files = sorted(self.layout.events_dir(self.run_id).glob("*.jsonl"))
        except OSError:
            files = []
        for path in files:
            raw = read_bounded(path, MAX_EVENTS_FILE)
            if raw is None:
                continue
            for event in parse_lines(raw.decode("utf-8", "replace")):
                if event.worker != self.worker and event.worker not in self._reported_workers:
                    events.append(event)
        return events
