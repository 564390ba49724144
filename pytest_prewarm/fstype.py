"""Which filesystem holds a path, and whether its flock can be trusted to exclude."""

from __future__ import annotations

import os
from pathlib import Path

# Filesystems whose flock does not exclude across clients, or that silently emulate it.
SHARED_FS = (
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


def flock_untrusted(fstype: str | None) -> bool:
    """Whether flock on this filesystem type may be refused or accepted without excluding."""
    return fstype is not None and (fstype in SHARED_FS or fstype.startswith("fuse."))
