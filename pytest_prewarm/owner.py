"""The owner record: who holds a template's lock, written atomically and read defensively."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# A record is a few hundred bytes; anything much larger is not ours and is not read whole.
MAX_RECORD_BYTES = 64 * 1024
# Linux's PID_MAX_LIMIT (2**22); a larger pid cannot be a real process on any host we know.
MAX_PID = 4_194_304


@dataclass(frozen=True)
class OwnerRecord:
    """Identity of a lock holder: enough to prove it dead, alive, or neither.

    ``start_ticks`` (field 22 of /proc/PID/stat) and ``boot_id`` identify a process across
    wall-clock steps and pid reuse; ``pid_ns`` tells pid namespaces apart, because two
    containers can share a hostname while their pids mean different processes.
    Fields are optional because records from other hosts, platforms or older versions may
    lack them; a missing field makes the owner "unknown", never "dead".
    """

    pid: int
    hostname: str | None
    boot_id: str | None
    pid_ns: int | None
    start_ticks: int | None
    create_time: float | None
    worker: str
    run_id: str
    started_at: float
    state: str = "held"  # "held" while the lock is held, "released" after a clean release
    template: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def released(self) -> OwnerRecord:
        return replace(self, state="released")

    def describe(self, *, local_hostname: str | None = None) -> str:
        """Human wording, e.g. ``gw3, pid 4242 on this host``."""
        where = (
            "on this host"
            if self.hostname is not None and self.hostname == local_hostname
            else f"on host {self.hostname or '<unrecorded>'}"
        )
        return f"{self.worker}, pid {self.pid} {where}"


def _opt_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise ValueError(name)
    return value


def _opt_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(name)
    return value


def parse_record(text: str) -> OwnerRecord | None:
    """Parse a record; anything malformed gives ``None`` (an unknown owner), never an error."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            return None
        pid = data.get("pid")
        if type(pid) is not int or not 0 < pid <= MAX_PID:
            return None
        create_time = data.get("create_time")
        if create_time is not None and type(create_time) not in (int, float):
            return None
        started_at = data.get("started_at", 0.0)
        if type(started_at) not in (int, float):
            return None
        state = _opt_str(data, "state") or "held"
        return OwnerRecord(
            pid=pid,
            hostname=_opt_str(data, "hostname"),
            boot_id=_opt_str(data, "boot_id"),
            pid_ns=_opt_int(data, "pid_ns"),
            start_ticks=_opt_int(data, "start_ticks"),
            create_time=None if create_time is None else float(create_time),
            worker=_opt_str(data, "worker") or "<unknown worker>",
            run_id=_opt_str(data, "run_id") or "",
            started_at=float(started_at),
            state=state,
            template=_opt_str(data, "template") or "",
        )
    except (ValueError, TypeError, RecursionError):
        return None


def read_record(path: Path) -> OwnerRecord | None:
    """Read a record without following symlinks and without reading more than a bound.

    A symlink, a directory, a FIFO or an oversized file is not a record: it reads as
    ``None``. O_NOFOLLOW and the fstat check keep a planted link from making us read
    (or block on) anything outside the lock dir.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return None
        raw = os.read(fd, MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return parse_record(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by rename, so a reader sees the old or the new file whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
