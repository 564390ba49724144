"""File operations every record in the lock dir goes through: one atomic write, one bounded read.

Anything can sit where a record should be: a FIFO, a directory, a symlink, a huge file,
garbage. Reads therefore never follow a final symlink, never block on a special file, and
never read more than a bound; writes go through a temporary file and one rename, so a
reader sees the old record or the new one whole, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from .trust import is_mine, remove_tree

# A record is a few hundred bytes; anything much larger is not ours and is not read whole.
MAX_RECORD_BYTES = 64 * 1024

# Not every platform has these flags (Windows lacks both); 0 leaves the open unchanged.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_temp(directory: Path, name: str, text: str) -> Path:
    """Write ``text`` to a fresh temporary file beside ``directory / name``.

    The caller renames it into place (``os.replace``) or removes it. Splitting the two
    lets the owner record be written before a lock is tried and installed right after.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by rename, so a reader sees the old or the new file whole."""
    tmp = write_temp(path.parent, path.name, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_bounded(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The bytes of the regular file at ``path``, or ``None`` for anything else.

    A symlink, a directory, a FIFO, a device, a file over ``limit`` bytes or a file of
    another user reads as ``None``: O_NOFOLLOW and the fstat check keep a planted link
    from making us read (or block on) anything outside the lock dir, and a record that
    another user could have written is never trusted.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit or not is_mine(info):
            return None
        return os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def decode_json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object, or ``None`` for anything else (torn, not UTF-8, nested too deep)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_json_object(path: Path, limit: int = MAX_RECORD_BYTES) -> dict[str, Any] | None:
    """The JSON object stored at ``path``, read with ``read_bounded``; ``None`` if unusable."""
    return decode_json_object(read_bounded(path, limit))


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (created owner-only), whole or not at all.

    Never through a symlink. A full disk can take part of a write (a short write) and
    refuse the rest; what got in would be a torn last line, and a later append would glue
    a good line to it. So a failed append cuts the file back to where it started: the
    caller's file is its own, and nobody else appends meanwhile.
    """
    data = memoryview(text.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0o600)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            with contextlib.suppress(OSError):  # shrinking a file needs no space
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def delete_in_background(path: Path) -> None:
    """Remove the tree at ``path`` in a daemon thread, never following a symlink in it."""
    thread = threading.Thread(target=remove_tree, args=(path,), daemon=True)
    thread.start()
