"""Codecs of the records a published or failed build leaves: meta.json and failure records.

Each kind has one encoder and one decoder. Decoders are strict about types and lenient
about absence: a record from another version or a torn write decodes as ``None`` (not
published, no failure), never as an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import PrewarmBuildError
from .files import read_json_object
from .owner import OwnerRecord

META_FORMAT = 1

HoldId = list[Any]  # [pid, started_at] of one hold of a lock


def hold_id(record: OwnerRecord | None) -> HoldId | None:
    """What names one hold of a lock: its holder's pid and when it took the lock."""
    return None if record is None else [record.pid, record.started_at]


@dataclass(frozen=True)
class Meta:
    """meta.json of a published template; written last, so its presence means complete."""

    name: str
    key: str  # the canonical JSON of the key
    value: Any
    built_by: str
    pid: int
    run_id: str
    boot_id: str | None
    build_seconds: float
    published_at: float
    holder: HoldId | None  # which hold published it: the next holder knows it finished

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": META_FORMAT,
                "name": self.name,
                "key": self.key,
                "value": self.value,
                "built_by": self.built_by,
                "pid": self.pid,
                "run_id": self.run_id,
                "boot_id": self.boot_id,
                "build_seconds": self.build_seconds,
                "published_at": self.published_at,
                "holder": self.holder,
            }
        )

    @classmethod
    def read(cls, path: Path) -> Meta | None:
        data = read_json_object(path)
        if data is None or data.get("format") != META_FORMAT:
            return None
        name, key, built_by, run_id = (data.get(f) for f in ("name", "key", "built_by", "run_id"))
        boot, pid, holder = data.get("boot_id"), data.get("pid"), data.get("holder")
        seconds, published = data.get("build_seconds"), data.get("published_at")
        if not all(isinstance(v, str) for v in (name, key, built_by, run_id)):
            return None
        if not (boot is None or isinstance(boot, str)) or type(pid) is not int:
            return None
        if not all(type(v) in (int, float) for v in (seconds, published)):
            return None
        if not (holder is None or isinstance(holder, list)):
            return None
        return cls(
            name=str(name),
            key=str(key),
            value=data.get("value"),
            built_by=str(built_by),
            pid=pid,
            run_id=str(run_id),
            boot_id=boot,
            build_seconds=float(seconds),  # type: ignore[arg-type]
            published_at=float(published),  # type: ignore[arg-type]
            holder=holder,
        )


# Tracebacks can be long; the builder clips what it records to fit (see request.py).
FAILURE_RECORD_LIMIT = 4 * 1024 * 1024


def failure_to_json(error: PrewarmBuildError) -> str:
    return json.dumps(
        {
            "template": error.template,
            "exc_type": error.exc_type,
            "exc_message": error.exc_message,
            "traceback": error.traceback_text,
            "worker": error.worker,
            "pid": error.pid,
            "output": error.output,
            "command_stderr": error.command_stderr,
            "command_stdout": error.command_stdout,
            "log_path": error.log_path,
        }
    )


def read_failure(path: Path) -> PrewarmBuildError | None:
    """The failure recorded at ``path``; a field of the wrong type reads as unrecorded.

    The output fields and the log path are optional: absent (a record of an earlier
    version) or of the wrong type, they read as empty and as no log.
    """
    data = read_json_object(path, limit=FAILURE_RECORD_LIMIT)
    if data is None:
        return None

    def text(field: str) -> str:
        value = data.get(field)
        return value if isinstance(value, str) else "<unrecorded>"

    def optional(field: str) -> str:
        value = data.get(field)
        return value if isinstance(value, str) else ""

    pid = data.get("pid")
    log_path = data.get("log_path")
    return PrewarmBuildError(
        template=text("template"),
        exc_type=text("exc_type"),
        exc_message=text("exc_message"),
        traceback_text=text("traceback"),
        worker=text("worker"),
        pid=pid if type(pid) is int else 0,
        output=optional("output"),
        command_stderr=optional("command_stderr"),
        command_stdout=optional("command_stdout"),
        log_path=log_path if isinstance(log_path, str) and log_path else None,
    )
