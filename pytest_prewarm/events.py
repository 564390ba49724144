"""Plain records of what happened to each template in one process; no pytest import.

They travel from workers to the controller as dicts (xdist's workeroutput carries only
builtin types) and are also appended to a per-worker file in the lock dir, so a worker
that crashes still reports what it did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Outcomes of one request for a template, from the requesting process's point of view.
BUILT = "built"  # this process ran the builder and published the template
WAITED = "waited"  # another process of this run built it; we waited and reused it
REUSED = "reused"  # it was already published (by an earlier run, or earlier in this one)
FAILED = "failed"  # the build failed, here or in another process of this run
TIMEOUT = "timeout"  # we gave up waiting for the lock


@dataclass
class TemplateEvent:
    template: str
    worker: str
    outcome: str
    wait_seconds: float = 0.0
    build_seconds: float | None = None
    built_by: str | None = None
    error: str | None = None
    recovered_from: str | None = None  # "gw2, pid 4100: dead, zombie"
    pid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemplateEvent:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)
