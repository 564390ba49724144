"""Choosing, creating and checking the lock dir, and cleaning up per-run default dirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .exceptions import LockDirError
from .files import write_atomic
from .kinds import LockMode
from .layout import Layout
from .liveness import Liveness, classify, own_record
from .owner import read_record

# Per-run default dirs live directly in the system temp dir, not under pytest-of-USER:
# pytest's numbered-dir cleanup deletes unknown "pytest-*" folders there, which would wipe
# a lock dir under a running suite.
RUN_DIR_PREFIX = "pytest-prewarm-run-"


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


# Filesystems whose flock does not exclude across clients, or that silently emulate it.
_SHARED_FS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "virtiofs",
    "ceph",
    "glusterfs",
    "lustre",
    "afs",
    "fuse",
)


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/self/mountinfo (Linux)."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type


def choose_lock_mode(path: Path, requested: LockMode | str) -> tuple[LockMode, str]:
    """(mode, why) for the lock dir; ``requested`` is auto, flock or lease."""
    requested = LockMode(requested)
    if requested is not LockMode.AUTO:
        return requested, "requested"
    fstype = filesystem_type(path)
    if fstype is not None and (fstype in _SHARED_FS or fstype.startswith("fuse.")):
        return LockMode.LEASE, f"auto: {fstype} filesystem, where flock cannot be trusted"
    from . import flock  # the probe is flock's own business

    try:
        refused = flock.probe(path)
    except OSError as exc:
        return LockMode.LEASE, f"auto: cannot create a probe file ({exc.strerror})"
    if refused is not None:
        return LockMode.LEASE, f"auto: {refused}"
    return LockMode.FLOCK, f"auto: {fstype or 'local'} filesystem supports flock"


def pin_mode(path: Path, mode: LockMode, why: str) -> None:
    """Record the lock dir's mode; refuse a run that would use the other one.

    A flock run and a lease run lock different files, so sharing one lock dir between
    them would exclude nothing. The first run to use the dir decides.
    """
    marker = Layout(path).mode_file
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            existing = marker.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LockDirError(f"cannot read {marker}: {exc.strerror}") from exc
        if existing and existing != mode:
            raise LockDirError(
                f"lock dir {str(path)!r} is used in {existing} mode, but this run would use "
                f"{mode} mode ({why}); the two do not exclude each other. Pass "
                f"--prewarm-lock-mode {existing}, or use another --prewarm-lock-dir"
            ) from None
        return
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(mode + "\n")


def create_run_dir(run_id: str, worker: str) -> Path:
    """A fresh lock dir for one test run, recorded with its creator so orphans can be swept."""
    sweep_orphans()
    path = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))  # mkdtemp makes it 0o700
    write_atomic(Layout(path).run_record, own_record(worker, run_id).to_json())
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
            record = read_record(Layout(entry).run_record)
            if record is not None and classify(record).state is Liveness.DEAD:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
