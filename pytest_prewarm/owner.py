"""The owner record: who holds a template's lock, written atomically and read defensively."""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import json
from pathlib import Path
from typing import Any, NamedTuple

from .files import decode_json_object, read_bounded
from .kinds import RecordState

# Linux's PID_MAX_LIMIT (2**22); a larger pid cannot be a real process on any host we know.
MAX_PID = 4_194_304


class OwnerRecord(NamedTuple):
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
    # A RecordState value, kept as the string read so that a record round-trips unchanged.
    state: str = RecordState.HELD.value
    template: str = ""

    def to_json(self) -> str:
        return json.dumps(self._asdict(), sort_keys=True)

    @property
    def is_held(self) -> bool:
        """Whether the record says its holder still holds (it never released cleanly)."""
        return self.state == RecordState.HELD

    def released(self) -> "OwnerRecord":
        return self._replace(state=RecordState.RELEASED.value)

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


def parse_record(text: str | bytes | None) -> OwnerRecord | None:
    """Parse a record; anything malformed gives ``None`` (an unknown owner), never an error."""
    data = decode_json_object(text)
    if data is None:
        return None
    try:
        pid = data.get("pid")
        if type(pid) is not int or not 0 < pid <= MAX_PID:
            return None
        create_time = data.get("create_time")
        if create_time is not None and type(create_time) not in (int, float):
            return None
        started_at = data.get("started_at", 0.0)
        if type(started_at) not in (int, float):
            return None
        state = _opt_str(data, "state") or RecordState.HELD.value
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
    except (ValueError, TypeError):
        return None


def read_record(path: Path) -> OwnerRecord | None:
    """The owner record at ``path``; a symlink, FIFO, directory or huge file reads as None."""
    return parse_record(read_bounded(path))
