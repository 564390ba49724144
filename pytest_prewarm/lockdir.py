"""Choosing, creating and checking the lock dir, and cleaning up per-run default dirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .liveness import Liveness, classify, local_host, own_identity
from .owner import OwnerRecord, read_record, write_atomic

# Per-run default dirs live directly in the system temp dir, not under pytest-of-USER:
# pytest's numbered-dir cleanup deletes unknown "pytest-*" folders there, which would wipe
# a lock dir under a running suite.
RUN_DIR_PREFIX = "pytest-prewarm-run-"
RUN_RECORD = ".run-owner.json"


class LockDirError(Exception):
    """The lock dir is unusable; the message says why and what to do."""


def prepare(path: Path, source: str) -> Path:
    """Create ``path`` (owner-only) if needed and prove we can write in it."""
    hint = (
        "pass a writable directory with --prewarm-lock-dir "
        f"(value {str(path)!r} came from {source})"
    )
    if path.exists() and not path.is_dir():
        raise LockDirError(f"lock dir {str(path)!r} exists and is not a directory; {hint}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LockDirError(f"cannot create lock dir {str(path)!r}: {exc.strerror}; {hint}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".prewarm-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LockDirError(
            f"lock dir {str(path)!r} is not writable: {exc.strerror}; {hint}"
        ) from exc
    return path


def create_run_dir(run_id: str, worker: str) -> Path:
    """A fresh lock dir for one test run, recorded with its creator so orphans can be swept."""
    sweep_orphans()
    path = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))  # mkdtemp makes it 0o700
    pid, ticks, created = own_identity()
    here = local_host()
    record = OwnerRecord(
        pid=pid,
        hostname=here.hostname,
        boot_id=here.boot_id,
        pid_ns=here.pid_ns,
        start_ticks=ticks,
        create_time=created,
        worker=worker,
        run_id=run_id,
        started_at=0.0,
    )
    write_atomic(path / RUN_RECORD, record.to_json())
    return path


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sweep_orphans(temp_root: Path | None = None) -> list[Path]:
    """Remove default lock dirs whose creating pytest process is provably dead.

    A controller killed with SIGKILL never runs its cleanup; without this sweep its dir
    would stay in the temp dir forever. A dir whose creator is alive or unknown (another
    container sharing /tmp) is left alone.
    """
    root = temp_root or Path(tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if not entry.name.startswith(RUN_DIR_PREFIX) or entry.is_symlink():
                continue
            record = read_record(entry / RUN_RECORD)
            if record is not None and classify(record).state is Liveness.DEAD:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
