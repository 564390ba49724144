"""Choosing, creating and checking the lock dir, and cleaning up per-run default dirs."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from . import clock
from .exceptions import DISK_FULL, LockDirError
from .files import read_bounded, write_temp
from .fstype import filesystem_type, flock_untrusted
from .kinds import LockMode
from .layout import RUN_RECORD, TAG_FILE, TAG_SIGNATURE, TAG_TEXT, Layout
from .rundir import RUN_DIR_PREFIX
from .trust import ancestor_problem, check_dir, dir_problem, is_mine, kind_of, remove_tree

# Names a lock dir of pytest-prewarm 0.1 (made before the tag file existed) can hold; such a
# dir, owned by this user and holding nothing else, is adopted rather than refused.
_LEGACY_NAMES = frozenset(
    {"locks", "staging", "templates", "failures", "trash", "events", "lock-mode"}
    | {".prewarm-flock-probe", RUN_RECORD}
)
# Every version before the tag made these five together, on its first request. Names alone
# are weak evidence: a user's own folder holding only trash/ or templates/ would otherwise be
# adopted, and adoption empties trash/ and supersedes what templates/ holds.
_LEGACY_MADE_TOGETHER = frozenset({"locks", "staging", "templates", "failures", "trash"})


def _full_disk_words(exc: OSError) -> str:
    """What to add to a lock-dir error when the disk (or the user's quota) is full."""
    return " (the filesystem is full)" if exc.errno in DISK_FULL else ""


def _hint(path: Path, source: str) -> str:
    return (
        "pass a writable directory with --prewarm-lock-dir (a new or empty one, or one "
        f"pytest-prewarm made; value {str(path)!r} came from {source})"
    )


def _lstat_lock_dir(path: Path, hint: str) -> os.stat_result | None:
    """The lock dir's lstat, None if it does not exist yet; a non-directory is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a path below a file (ENOTDIR), too long, unreadable
        raise LockDirError(f"cannot create lock dir {str(path)!r}: {exc.strerror}; {hint}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise LockDirError(
            f"lock dir {str(path)!r} exists and is not a directory (it is "
            f"{kind_of(info.st_mode)}); {hint}"
        )
    return info


def check_at_start(path: Path, source: str) -> None:
    """Refuse a lock dir that ``prepare`` would refuse, without writing anything.

    Run at start-up for a lock dir the user named, so that a wrong one is a usage error
    at once, while a run that asks for no template creates nothing: the directory, its
    tag and the mode pin are made by ``prepare`` on the first request. What is checked:
    a missing dir must be creatable (its nearest existing ancestor a directory we may
    write in); an existing one must be a directory of ours that is tagged, empty or of
    an earlier version, and writable.
    """
    hint = _hint(path, source)
    _check_ancestors(path)
    if _lstat_lock_dir(path, hint) is None:
        ancestor = _missing_dirs(path)[-1].parent  # the nearest one that exists
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise LockDirError(
                f"cannot create lock dir {str(path)!r}: {ancestor} is not writable; {hint}"
            )
        return
    check_dir(path, shared_ok=True)
    layout = Layout(path)
    if not _is_tagged(layout):
        _refuse_foreign(layout, hint)
    if not os.access(path, os.W_OK | os.X_OK):
        raise LockDirError(f"lock dir {str(path)!r} is not writable; {hint}")


def prepare(path: Path, source: str) -> Path:
    """Create ``path`` (owner-only) or adopt it, mark it as ours, and prove we can write in it.

    An existing directory is used only if it carries our tag, is empty, or is a lock dir of
    an earlier version; anything else is refused and left untouched. Processes of one run
    (or of several) may prepare one lock dir at the same moment: every step is create-once.
    """
    hint = _hint(path, source)
    _check_ancestors(path)
    info = _lstat_lock_dir(path, hint)
    if info is None:
        try:
            _make_owner_only(path)
        except OSError as exc:
            raise LockDirError(
                f"cannot create lock dir {str(path)!r}: {exc.strerror}; {hint}"
            ) from exc
    check_dir(path, shared_ok=True)
    layout = Layout(path)
    if not _is_tagged(layout):
        _adopt(layout, hint)
    _prove_writable(layout, hint)
    return path


def _make_owner_only(path: Path) -> None:
    """Create ``path`` and every missing directory above it, each owner-only.

    ``Path.mkdir(parents=True)`` gives the parents it makes the umask's mode (0777 under
    umask 0): the lock dir would sit below directories anyone may write, which the next
    run's start-up check refuses, and rightly.
    """
    for directory in reversed(_missing_dirs(path)):
        with contextlib.suppress(FileExistsError):  # another process of the run, first
            os.mkdir(directory, 0o700)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and each missing directory above it, deepest first (none if it exists)."""
    missing = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


def _check_ancestors(path: Path) -> None:
    problem = ancestor_problem(path)
    if problem is not None:
        raise LockDirError(f"{problem}; nothing was changed")


def _is_tagged(layout: Layout) -> bool:
    raw = read_bounded(layout.tag_file)
    return raw is not None and raw.startswith(TAG_SIGNATURE.encode())


# Files another run creates for a moment while it adopts or probes the same fresh lock dir:
# runs starting together must not take each other's for the user's files.
_TRANSIENT = (f".{TAG_FILE}.", ".prewarm-probe-", ".prewarm-flock-probe-", ".lock-mode.")


def _refuse_foreign(layout: Layout, hint: str) -> None:
    """Refuse an untagged dir that holds anything but an earlier version's lock dir."""
    try:
        entries = [n for n in os.listdir(layout.root) if not n.startswith(_TRANSIENT)]
    except OSError as exc:
        raise LockDirError(f"cannot list lock dir {str(layout.root)!r}: {exc.strerror}") from exc
    if _is_tagged(layout):
        return  # a run starting at the same moment adopted it first
    legacy = _LEGACY_MADE_TOGETHER <= set(entries) <= _LEGACY_NAMES
    if legacy:
        for name in entries:
            check_dir_or_mine(layout.root / name)
    elif entries:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise LockDirError(
            f"lock dir {str(layout.root)!r} is not empty ({shown}) and was not made by "
            f"pytest-prewarm (it has no {TAG_FILE} file, nor all of "
            f"{', '.join(sorted(_LEGACY_MADE_TOGETHER))} as an earlier version made them); "
            f"nothing in it was touched. A lock dir must be one of its own; {hint}"
        )


def _adopt(layout: Layout, hint: str) -> None:
    _refuse_foreign(layout, hint)
    try:
        _link_new(layout.tag_file, TAG_TEXT)
    except OSError as exc:
        full = _full_disk_words(exc)
        raise LockDirError(
            f"lock dir {str(layout.root)!r} is not writable: {exc.strerror}{full} (while "
            f"marking it as pytest-prewarm's with {TAG_FILE}); {hint}"
        ) from exc


def _link_new(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` whole, or leave an existing one; True if created.

    The text goes to a temporary file that is hard-linked into place: atomic and
    exclusive, so a concurrent reader sees no file or the whole file, never an empty one.
    Where hard links are refused, an exclusive create written at once takes its place.
    """
    tmp = write_temp(path.parent, path.name, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    finally:
        os.unlink(tmp)


def check_dir_or_mine(path: Path) -> None:
    """A legacy entry must be a directory we may use, or a regular file of ours."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return  # gone since the listing: nothing there to refuse
    except OSError as exc:
        raise LockDirError(f"cannot look at {path}: {exc.strerror}") from exc
    if stat.S_ISDIR(info.st_mode):
        check_dir(path)
    elif not (stat.S_ISREG(info.st_mode) and is_mine(info)):
        raise LockDirError(
            f"{path} is {kind_of(info.st_mode)} that pytest-prewarm did not make; nothing "
            "was touched. Remove it, or use another --prewarm-lock-dir."
        )


def _prove_writable(layout: Layout, hint: str) -> None:
    for attempt in range(2):  # pragma: no branch - the second attempt returns or raises
        try:
            fd, probe = tempfile.mkstemp(prefix=".prewarm-probe-", dir=layout.root)
            os.close(fd)
            os.unlink(probe)
            return
        except OSError as exc:
            if exc.errno in DISK_FULL and attempt == 0:
                # A run cut short can leave its trash behind on a full disk: make room.
                for leftover in _trash_entries(layout):
                    remove_tree(leftover)
                continue
            full = _full_disk_words(exc)
            raise LockDirError(
                f"lock dir {str(layout.root)!r} is not writable: {exc.strerror}{full}; {hint}"
            ) from exc


def _trash_entries(layout: Layout) -> list[Path]:
    if dir_problem(layout.trash) is not None:
        return []
    try:
        return list(layout.trash.iterdir())
    except OSError:
        return []


def choose_lock_mode(path: Path, requested: LockMode | str) -> tuple[LockMode, str]:
    """(mode, why) for the lock dir; ``requested`` is auto, flock or lease."""
    requested = LockMode(requested)
    if requested is not LockMode.AUTO:
        return requested, "requested"
    fstype = filesystem_type(path)
    if flock_untrusted(fstype):
        return LockMode.LEASE, f"auto: {fstype} filesystem, where flock cannot be trusted"
    from .flock import probe as flock_probe  # the probe is flock's own business

    try:
        refused = flock_probe(path)
    except OSError as exc:
        return LockMode.LEASE, f"auto: cannot create a probe file ({exc.strerror})"
    if refused is not None:
        return LockMode.LEASE, f"auto: {refused}"
    return LockMode.FLOCK, f"auto: {fstype or 'local'} filesystem supports flock"


def settle_mode(path: Path, requested: LockMode | str) -> tuple[LockMode, str]:
    """(mode, why) for this process in the lock dir ``path``, pinned there by the first one.

    Without a pin, the mode is chosen (``choose_lock_mode``) and pinned; a process that
    races to pin the other mode fails in ``pin_mode``. With a pin, ``auto`` takes the
    pinned mode without probing again (every process of a run but the first), unless the
    pin says flock on a filesystem where flock cannot be trusted: then ``pin_mode``
    refuses, as it refuses a requested mode other than the pin.
    """
    requested = LockMode(requested)
    pinned = read_pin(path)
    if pinned is not None and requested is LockMode.AUTO:
        fstype = filesystem_type(path)
        if not (pinned is LockMode.FLOCK and flock_untrusted(fstype)):
            return pinned, f"auto: {pinned}, pinned in the lock dir by the first process to use it"
        mode, why = LockMode.LEASE, f"auto: {fstype} filesystem, where flock cannot be trusted"
    else:
        mode, why = choose_lock_mode(path, requested)
    pin_mode(path, mode, why)
    return mode, why


def pin_mode(path: Path, mode: LockMode, why: str) -> None:
    """Record the lock dir's mode; refuse a run that would use the other one.

    A flock run and a lease run lock different files, so sharing one lock dir between
    them would exclude nothing. The first run to use the dir decides: the mode is written
    to a temporary file and hard-linked into place, which is atomic and exclusive, so a
    concurrent run reads no mode or the whole mode, never an empty file.
    """
    marker = Layout(path).mode_file
    try:
        if not os.path.lexists(marker) and _link_new(marker, mode + "\n"):
            return
    except OSError as exc:  # a full disk (or inodes), a dir gone: words, not a raw OSError
        raise LockDirError(
            f"cannot record the lock mode in {marker}: {exc.strerror}"
            f"{_full_disk_words(exc)}; free space there, or pass another --prewarm-lock-dir"
        ) from exc
    raw = read_bounded(marker)
    if raw is None:
        raise LockDirError(
            f"{marker} is not a lock-mode file of this user (a symlink, a special file or "
            "another user's file); nothing was changed. Remove it, or use another "
            "--prewarm-lock-dir"
        )
    existing = raw.decode("utf-8", "replace").strip()
    if existing and existing not in (LockMode.FLOCK, LockMode.LEASE):
        # Not a mode any version writes: show it clipped and escaped, never pasted whole
        # (it may be 64 KiB of control characters), and never suggest passing it back.
        shown = repr(existing[:40]) + (" (clipped)" if len(existing) > 40 else "")
        raise LockDirError(
            f"{marker} holds {shown}, not a lock mode (flock or lease); nothing was "
            "changed. Remove the file if no run uses the lock dir, or use another "
            "--prewarm-lock-dir"
        )
    if existing and existing != mode:
        raise LockDirError(
            f"lock dir {str(path)!r} is used in {existing} mode, but this run would use "
            f"{mode} mode ({why}); the two do not exclude each other. Pass "
            f"--prewarm-lock-mode {existing}, or use another --prewarm-lock-dir"
        )


def open_run_dir(path: Path, run_id: str, creator_pid: int) -> None:
    """Create this run's default lock dir, or join it if another process of the run did.

    Several workers may ask for their first template at once: ``mkdir`` decides who
    creates the dir, the tag and the run record are create-once, so every process ends
    with the same complete dir. The run record names the run's controller
    (``creator_pid``), which outlives every worker, so a later run's sweep never takes
    the dir of a run still going. Older runs' dirs are swept when this run ends
    (``retire_run_dir``), not here: the first request is on a build's critical path.
    """
    from .liveness import own_record  # only for a run that uses a template

    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # another process of this run was first; check_dir proves it is ours
    except OSError as exc:
        full = _full_disk_words(exc)
        raise LockDirError(
            f"cannot create a per-run lock dir in {path.parent}: {exc.strerror}{full}; free "
            "space there, set TMPDIR, or pass --prewarm-lock-dir"
        ) from exc
    check_dir(path)  # a name taken by someone else (a symlink, another user's dir) fails
    layout = Layout(path)
    try:
        # Looked for first: most processes of a run find both made (nobody else can
        # write in this owner-only dir), and only the first pays for the temp files.
        if not os.path.lexists(layout.tag_file):
            _link_new(layout.tag_file, TAG_TEXT)
        if not os.path.lexists(layout.run_record):
            _link_new(layout.run_record, own_record("main", run_id, creator_pid).to_json())
    except OSError as exc:
        full = _full_disk_words(exc)
        raise LockDirError(
            f"cannot write in the per-run lock dir {path}: {exc.strerror}{full}; free space "
            "there, set TMPDIR, or pass --prewarm-lock-dir"
        ) from exc


def retire_run_dir(path: Path, *, keep: int) -> None:
    """End of the run that made ``path``: keep it (and the ``keep - 1`` newest before it).

    Its templates stay inspectable, the way pytest keeps the last few basetemps. With
    ``keep`` 0 it goes at once, but for the logs of failed builds (``remove_run_dir``).
    The run record's mtime marks when the run ended: the sweep keeps the newest.
    """
    if keep <= 0:
        remove_run_dir(path)
    else:
        with contextlib.suppress(OSError):
            os.utime(Layout(path).run_record)
    sweep_orphans(path.parent, keep=max(0, keep - 1))


def forget_run(path: Path, run_id: str) -> None:
    """Remove one run's bookkeeping (events, failure records) from a lock dir.

    A shared lock dir keeps its templates across runs, not per-run records; a later run
    must try a failed build again anyway.
    """
    layout = Layout(path)
    remove_tree(layout.events_dir(run_id))
    for record in layout.failures_of_run(run_id):
        with contextlib.suppress(OSError):
            record.unlink()


def check_pin_at_start(path: Path, requested: str, source: str) -> None:
    """Refuse a lock mode asked for that differs from the one the lock dir is pinned to."""
    if requested == LockMode.AUTO:
        return  # auto takes the pinned mode
    pinned = read_pin(path)
    if pinned is not None and pinned != requested:
        raise LockDirError(
            f"lock dir {str(path)!r} is used in {pinned} mode, but this run asks for "
            f"{requested} mode (from {source}); the two do not exclude each other. Pass "
            f"--prewarm-lock-mode {pinned} (or auto), or use another --prewarm-lock-dir"
        )


def read_pin(path: Path) -> LockMode | None:
    """The mode pinned in the lock dir, None if there is none (yet) or it is unreadable."""
    raw = read_bounded(Layout(path).mode_file)
    try:
        return None if raw is None else LockMode(raw.decode("utf-8", "replace").strip())
    except ValueError:
        return None


def remove_run_dir(path: Path) -> None:
    """Remove a per-run dir at the end of its run, except the logs of failed builds.

    Their errors name them, so they must outlive the run: such a dir keeps ``failures/``
    (records and logs), its tag and its run record, and a later run's sweep removes it
    once its newest log is RUN_LOGS_KEPT_FOR old (a day).
    """
    layout = Layout(path)
    if not layout.build_logs():
        remove_tree(path)
        return
    kept = _kept_of_failed_run(layout)
    with contextlib.suppress(OSError):
        for entry in path.iterdir():
            if entry.name not in kept:
                remove_tree(entry)


def _kept_of_failed_run(layout: Layout) -> set[str]:
    """What remove_run_dir keeps of a run whose builds failed: the logs, tag, run record."""
    return {"failures", layout.tag_file.name, layout.run_record.name}


def sweep_orphans(temp_root: Path | None = None, *, keep: int = 0) -> list[Path]:
    """Remove default lock dirs of ended runs but the ``keep`` that ended last.

    A run's dir is kept after it ends, for inspection, and a controller killed with
    SIGKILL never runs its cleanup: this sweep bounds what stays. Only a real directory
    of this user that carries our tag and a run record of a provably dead creator is
    removed; anything else (a dir of another user, of a live or unknown creator, an
    untagged dir, a symlink) is left alone. A dir holding a failed build's log younger
    than RUN_LOGS_KEPT_FOR is kept as well, and is not one of the ``keep``: that build's
    error named the log. Once its run has ended it is trimmed to the logs. It is found
    first, by one directory read, and a trimmed one by another, before any run's liveness
    is judged: run after run of failing builds kept hundreds of them, and judging each
    one's run made every run's end 100 ms longer.
    """
    root = temp_root or Path(tempfile.gettempdir())
    ended: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if not entry.name.startswith(RUN_DIR_PREFIX) or dir_problem(entry):
                continue
            layout = Layout(entry)
            if not entry.is_dir() or entry.is_symlink() or not _is_tagged(layout):
                continue
            if _holds_recent_logs(layout):
                # Errors named these logs: keep them a while, and nothing else once the run
                # is over (its templates can be gigabytes). A dir already trimmed is told
                # by one listing, so it costs no liveness judgement run after run.
                if not _trimmed(layout) and _run_ended(layout):
                    remove_run_dir(entry)
                continue
            if _run_ended(layout):
                with contextlib.suppress(OSError):
                    ended.append((os.lstat(layout.run_record).st_mtime, entry))
    ended.sort(reverse=True)
    removed = []
    for _, entry in ended[keep:]:
        remove_tree(entry)
        removed.append(entry)
    return removed


# A per-run dir that kept the logs of failed builds outlives its run by this long, so the
# log paths its errors named still exist when someone reads them.
RUN_LOGS_KEPT_FOR = 24 * 3600.0


def _run_ended(layout: Layout) -> bool:
    """Whether the run that made this per-run dir is over: its creator is provably dead."""
    from .liveness import Liveness, classify  # only for a run that uses a template
    from .owner import read_record

    record = read_record(layout.run_record)
    return record is not None and classify(record).state is Liveness.DEAD


def _trimmed(layout: Layout) -> bool:
    """Whether ``layout`` holds no more than remove_run_dir keeps of a failed run."""
    try:
        return set(os.listdir(layout.root)) <= _kept_of_failed_run(layout)
    except OSError:
        return True  # gone or unreadable: nothing to trim


def _holds_recent_logs(layout: Layout) -> bool:
    """Whether ``failures/<id>/`` holds a log younger than RUN_LOGS_KEPT_FOR."""
    cutoff = clock.wall() - RUN_LOGS_KEPT_FOR
    for log in layout.build_logs():
        with contextlib.suppress(OSError):
            if os.lstat(log).st_mtime > cutoff:
                return True
    return False
