"""The plugin's vocabularies as Enums: lock modes, request outcomes, origins, record states.

They are ``StrEnum``s because each value is also written to JSON records and reports, and
users compare ``template.origin == "built"``; a ``StrEnum`` member equals its string.
"""

from __future__ import annotations

from enum import StrEnum


class LockMode(StrEnum):
    """How templates' locks exclude each other. ``AUTO`` is only ever requested, not used."""

    AUTO = "auto"
    FLOCK = "flock"  # a kernel lock, released by the kernel the moment its holder dies
    LEASE = "lease"  # claim files with a heartbeat, for filesystems where flock lies


class Outcome(StrEnum):
    """What one request for a template came to, from the requesting process's view."""

    BUILT = "built"  # this process ran the builder and published the template
    WAITED = "waited"  # another process of this run built it; we waited and reused it
    REUSED = "reused"  # already published (by an earlier run, or earlier in this one)
    FAILED = "failed"  # the build failed, here or in another process of this run
    TIMEOUT = "timeout"  # we gave up waiting for the lock
    SUPPLIED = "supplied"  # given from outside (--prewarm-supply): never built or changed


class Origin(StrEnum):
    """How a process got the template it holds: the successful subset of ``Outcome``."""

    BUILT = "built"
    WAITED = "waited"
    REUSED = "reused"
    SUPPLIED = "supplied"


class RecordState(StrEnum):
    """An owner record's state: written "held" with the lock, "released" on a clean release."""

    HELD = "held"
    RELEASED = "released"
