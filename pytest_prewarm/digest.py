"""The digest of a template's tree, so a template can be trusted in another boot or machine.

A template published in this boot is trusted as it stands: the kernel's page cache holds
what the builder wrote. One that comes from elsewhere (a lock dir restored from a CI
cache, or a boot after a crash: templates are not fsynced) may be torn or tampered with,
so it is reused only if its tree still matches the manifest written at publication.

The manifest is one line per entry, sorted by path: type, path, and for a file its
executable bit, size and SHA-256, for a link its target. It sits beside the data (see
layout.py), and the digest in meta.json is the SHA-256 of the manifest, so neither can be
changed without the other one telling.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .files import O_CLOEXEC, O_NOFOLLOW

# Hashing is chunked by hashlib.file_digest, which releases the GIL while it reads.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def manifest(root: Path) -> str:
    """The manifest of the tree under ``root``; links are recorded, never followed."""
    lines: list[str] = []
    _walk(root, "", lines)
    return "".join(f"{line}\n" for line in lines)


def _walk(directory: Path, prefix: str, lines: list[str]) -> None:
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        rel = f"{prefix}{entry.name}"
        info = entry.stat(follow_symlinks=False)
        quoted = _quote(rel)
        if stat.S_ISLNK(info.st_mode):
            lines.append(f"l {quoted} -> {_quote(os.readlink(entry.path))}")
        elif stat.S_ISDIR(info.st_mode):
            lines.append(f"d {quoted}")
            _walk(Path(entry.path), f"{rel}/", lines)
        elif stat.S_ISREG(info.st_mode):
            executable = "x" if info.st_mode & stat.S_IXUSR else "-"
            lines.append(f"f {quoted} {executable} {info.st_size} {_file_sha256(entry.path)}")
        else:  # a FIFO or a socket (a server's): its kind is all there is to compare
            lines.append(f"o {quoted} {stat.S_IFMT(info.st_mode):o}")


def _quote(path: str) -> str:
    # One entry per line whatever the name holds: escape what would break the line.
    return path.encode("unicode_escape", "backslashreplace").decode("ascii").replace(" ", "\\x20")


def _file_sha256(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def digest_of(manifest_text: str) -> str:
    return "sha256:" + hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()


def first_difference(recorded: str, current: str) -> str:
    """In words, the first entry where two manifests differ: what a rebuild's reason names."""
    old = dict(_by_path(recorded))
    new = dict(_by_path(current))
    for path in sorted(set(old) | set(new)):
        if path not in new:
            return f"{path} is missing"
        if path not in old:
            return f"{path} was added"
        if old[path] != new[path]:
            return f"{path} changed"
    return "the manifest was changed"  # same entries: only the manifest itself was edited


def _by_path(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        _kind, _, rest = line.partition(" ")
        path = rest.split(" ", 1)[0]
        pairs.append((path, line))
    return pairs
