"""Is this path ours? Ownership, mode and type checks, and removal that never follows a link.

A lock dir may sit in a shared place (/tmp, a CI cache mount) where another local user can
create names. Everything the plugin opens there is therefore checked: a directory of the
layout must be a real directory (not a symlink) owned by the running user and not
writable by others (unless sticky, as /tmp is); a record or template must belong to the
running user. Inside directories that pass, nobody else can plant anything.

Where the platform has no user ids (Windows), ownership is not checked; the docs say so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from pathlib import Path

from .exceptions import LockDirError

# Windows has ACLs, not mode bits: os.stat reports every directory as 0o777 and none as
# sticky, so a mode check there would refuse every lock dir.
POSIX_MODES = sys.platform != "win32"


def my_uid() -> int | None:
    if sys.platform == "win32":  # no user ids to compare
        return None  # pragma: no cover - Windows only
    return os.geteuid()


def owner_name(uid: int) -> str:
    if sys.platform == "win32":  # no pwd module there
        return f"uid {uid}"  # pragma: no cover - Windows only
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def is_mine(info: os.stat_result) -> bool:
    """Whether the file described by ``info`` belongs to the running user."""
    uid = my_uid()
    return uid is None or info.st_uid == uid


def kind_of(mode: int) -> str:
    """Words for a file type: "a symbolic link", "a FIFO", "a directory"..."""
    for test, words in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return words
    return "a special file"


def dir_problem(path: Path, *, shared_ok: bool = False) -> str | None:
    """Why ``path`` is not a directory we may use, or None (missing counts as fine).

    ``shared_ok``: a sticky directory writable by others (like /tmp) is acceptable; only
    the lock dir itself may be one. Inside it, every directory is ours alone.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is {kind_of(info.st_mode)}, where a directory should be"
    mode = stat.S_IMODE(info.st_mode)
    if not is_mine(info):
        return (
            f"{path} belongs to {owner_name(info.st_uid)}, not to the user running pytest "
            f"({owner_name(my_uid() or 0)}); mode {mode:04o}"
        )
    if not POSIX_MODES:  # pragma: no cover - Windows only
        return None
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not (shared_ok and mode & stat.S_ISVTX):
        sticky = "" if shared_ok else " (only the lock dir itself may be shared, if sticky)"
        return (
            f"{path} is writable by other users (mode {mode:04o}{sticky}), so they could "
            f"plant files in it; run: chmod go-w {path}"
        )
    return None


def link_problem(given: Path) -> str | None:
    """Why the lock dir path as the user wrote it must not be followed, or None.

    Links on the way are how a path reaches a real place (macOS's /tmp is a link to
    /private/tmp), so a link owned by root or by the running user is followed. One owned
    by anyone else could be pointed anywhere the running user may write, between one run
    and the next; and the lock dir itself must be a directory, never a link to one. A
    followed link's target is walked the same way: a link of ours may lead through
    someone else's.
    """
    current = Path(given.anchor)
    pending = list(given.parts[1:])
    followed = 0
    while pending:
        part = pending.pop(0)
        candidate = current / part
        try:
            info = os.lstat(candidate)
        except OSError:  # missing (we create the rest) or unreadable: later checks say why
            return None
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        target = os.readlink(candidate)
        if not pending:
            return (
                f"the lock dir {candidate} is a symbolic link (to {target}); a lock dir is "
                "never reached through a link: name the directory itself"
            )
        if info.st_uid not in (0, my_uid()):
            return (
                f"{candidate} on the lock dir's path is a symbolic link (to {target}) owned "
                f"by {owner_name(info.st_uid)}, who could point it elsewhere; name a path "
                "without it"
            )
        followed += 1
        if followed > 40:  # the kernel's own limit is about this: a loop, not a path
            return f"{given} goes through too many symbolic links (a loop?)"
        link_target = Path(target)
        if link_target.is_absolute():
            current = Path(link_target.anchor)
            pending = list(link_target.parts[1:]) + pending
        else:
            pending = list(link_target.parts) + pending
    return None


def ancestor_problem(real: Path) -> str | None:
    """Why a directory above the (resolved) lock dir lets others swap it, or None.

    Whoever may write in a parent that is not sticky can rename the lock dir away and put
    a directory or link of their own in its place while a run uses it. Group-writable
    parents are allowed: with a private group per user, the default on Debian and
    Fedora, that group is the user alone.
    """
    if not POSIX_MODES:  # pragma: no cover - Windows only
        return None
    for parent in real.parents:
        try:
            info = os.lstat(parent)
        except OSError:
            continue  # not created yet: we create it, owner-only
        mode = stat.S_IMODE(info.st_mode)
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return (
                f"{parent}, above the lock dir, is writable by every user and not sticky "
                f"(mode {mode:04o}), so anyone could replace the lock dir while a run uses "
                f"it; run: chmod o-w {parent} (or chmod +t {parent}), or use another "
                "--prewarm-lock-dir"
            )
    return None


def check_dir(path: Path, *, shared_ok: bool = False) -> None:
    """Raise LockDirError when ``path`` exists and is not a directory we may use."""
    problem = dir_problem(path, shared_ok=shared_ok)
    if problem is not None:
        raise LockDirError(
            f"{problem}. pytest-prewarm uses only directories of its own user that others "
            "cannot write to; nothing was changed. Fix it, or use another --prewarm-lock-dir."
        )


def make_dir(path: Path) -> None:
    """Create ``path`` (owner-only) unless it exists, then check that it is ours."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    check_dir(path)


def remove_tree(path: Path) -> None:
    """Remove the tree at ``path`` without following a symlink anywhere in it.

    A symlink given as ``path`` itself is unlinked, never followed. Where rmtree cannot
    resist symlink attacks (no fd-based version), the tree is walked by hand with lstat.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    if shutil.rmtree.avoids_symlink_attacks:
        shutil.rmtree(path, ignore_errors=True)
        return
    for root, dirs, files in os.walk(path, topdown=False, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
    with contextlib.suppress(OSError):
        os.rmdir(path)


def why_unreadable(path: Path) -> str:
    """Why a record at ``path`` could not be read, in words for a waiter's message."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "no owner record"
    except OSError as exc:
        return f"owner record unreadable ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return f"the owner record {path} is {kind_of(info.st_mode)}, not a record"
    if not is_mine(info):
        return f"the owner record {path} belongs to {owner_name(info.st_uid)}: not trusted"
    return "no readable owner record (torn, oversized or not one of ours)"
