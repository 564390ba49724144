"""Codecs of the records a published or failed build leaves: meta.json and failure records.

Each kind has one encoder and one decoder. Decoders are strict about types and lenient
about absence: a record from another version or a torn write decodes as ``None`` (not
published, no failure), never as an exception.
"""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import json
from pathlib import Path
from typing import Any, NamedTuple

from .exceptions import PrewarmBuildError
from .files import read_json_object
from .names import is_build_name
from .owner import OwnerRecord

# 2: the build's directory is named in meta.json (published in place, not renamed), with a
# digest of its tree. 1 (0.1): the data sat beside meta.json. Both are read.
META_FORMAT = 2
READABLE_FORMATS = (1, 2)

HoldId = list[Any]  # [pid, started_at] of one hold of a lock


def hold_id(record: OwnerRecord | None) -> HoldId | None:
    """What names one hold of a lock: its holder's pid and when it took the lock."""
    return None if record is None else [record.pid, record.started_at]


class Meta(NamedTuple):
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
    build: str = ""  # the build directory's name under templates/<id>/ ("": format 1)
    digest: str | None = None  # of the data tree (see digest.py), checked in another boot
    data_path: str | None = None  # where it was built: in-place templates name that path
    requires: dict[str, str] | None = None  # the layers it was built on: name -> digest

    def replace(self, **changes: Any) -> "Meta":
        return self._replace(**changes)

    def to_json(self) -> str:
        return json.dumps(
            {
                # A build of "" is the format-1 layout (data beside meta.json): say so.
                "format": META_FORMAT if self.build else 1,
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
                "build": self.build,
                "digest": self.digest,
                "data_path": self.data_path,
                "requires": self.requires,
            }
        )

    @classmethod
    def read(cls, path: Path) -> "Meta | None":
        data = read_json_object(path)
        if data is None or data.get("format") not in READABLE_FORMATS:
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
        build, digest, data_path = data.get("build", ""), data.get("digest"), data.get("data_path")
        requires = data.get("requires")
        # The build's name becomes a path: one plain part of ours, or the record is not used.
        if not is_build_name(build) or (data["format"] == 1) != (build == ""):
            return None
        if not all(v is None or isinstance(v, str) for v in (digest, data_path)):
            return None
        if requires is not None and not (
            isinstance(requires, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in requires.items())
        ):
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
            build=str(build),
            digest=digest,
            data_path=data_path,
            requires=requires,
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
