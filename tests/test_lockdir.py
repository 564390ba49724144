"""The lock dir's own code driven directly: adoption, the proof of writability, the mode pin,
per-run dirs and the sweep of dead runs' dirs. Full disks and read-only disks are real
(small tmpfs mounts); nothing of the user's is ever touched.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import Tmpfs, fill_up, use_up_inodes

from pytest_prewarm.exceptions import LockDirError
from pytest_prewarm.kinds import LockMode
from pytest_prewarm.layout import TAG_FILE, Layout
from pytest_prewarm.liveness import own_record
from pytest_prewarm.lockdir import (
    check_at_start,
    check_dir_or_mine,
    choose_lock_mode,
    open_run_dir,
    pin_mode,
    prepare,
    remove_run_dir,
    sweep_orphans,
)
from pytest_prewarm.rundir import RUN_DIR_PREFIX, run_dir_path

# -- adopting a directory that has no tag ---------------------------------------------------


LEGACY_SUBDIRS = ("locks", "staging", "templates", "failures", "trash")


def _legacy(root: Path, mode: int = 0o700) -> Path:
    """A lock dir as every version before the tag left it: its five subdirectories."""
    for sub in LEGACY_SUBDIRS:
        (root / sub).mkdir(parents=True, mode=mode)
    return root


def test_a_legacy_lock_dir_holding_a_special_file_is_refused_and_left_untouched(tmp_path):
    legacy = _legacy(tmp_path / "legacy")
    os.mkfifo(legacy / "lock-mode")

    with pytest.raises(LockDirError) as info:
        prepare(legacy, "--prewarm-lock-dir")

    assert str(info.value) == (
        f"{legacy / 'lock-mode'} is a FIFO that pytest-prewarm did not make; nothing was "
        "touched. Remove it, or use another --prewarm-lock-dir."
    )
    assert sorted(p.name for p in legacy.iterdir()) == sorted(["lock-mode", *LEGACY_SUBDIRS])
    assert stat.S_ISFIFO(os.lstat(legacy / "lock-mode").st_mode)


def test_a_legacy_lock_dir_with_a_shared_subdirectory_is_refused(tmp_path):
    legacy = _legacy(tmp_path / "legacy")
    (legacy / "staging").chmod(0o777)

    with pytest.raises(LockDirError, match=r"staging is writable by other users \(mode 0777"):
        prepare(legacy, "--prewarm-lock-dir")

    assert not (legacy / TAG_FILE).exists()


def test_a_legacy_lock_dir_of_regular_files_and_directories_is_adopted(tmp_path):
    legacy = _legacy(tmp_path / "legacy")
    (legacy / "lock-mode").write_text("lease\n")

    assert prepare(legacy, "ini") == legacy

    assert (legacy / TAG_FILE).read_text().startswith("Signature: pytest-prewarm lock dir")
    assert (legacy / "lock-mode").read_text() == "lease\n"


@pytest.mark.parametrize("names", [("trash",), ("trash", "templates"), LEGACY_SUBDIRS[1:]])
def test_a_users_folder_with_some_of_the_legacy_names_is_refused_and_untouched(
    tmp_path: Path, names: tuple[str, ...]
) -> None:
    # Adopting it would empty its trash/ and supersede what its templates/ holds.
    folder = tmp_path / "mine"
    for name in names:
        (folder / name / "photos").mkdir(parents=True)
        (folder / name / "photos" / "img1.jpg").write_text("precious")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    with pytest.raises(LockDirError, match="was not made by pytest-prewarm") as info:
        prepare(folder, "--prewarm-lock-dir")

    assert "nothing in it was touched" in str(info.value)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    with pytest.raises(LockDirError, match="was not made by pytest-prewarm"):
        check_at_start(folder, "--prewarm-lock-dir")


def test_a_legacy_entry_gone_since_the_listing_is_no_error(tmp_path: Path) -> None:
    check_dir_or_mine(tmp_path / "gone")  # another run's, removed between list and look

    below_a_file = tmp_path / "file"
    below_a_file.write_text("")
    with pytest.raises(LockDirError, match=r"cannot look at .*: Not a directory"):
        check_dir_or_mine(below_a_file / "entry")


def test_missing_parents_are_made_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    lock_dir = tmp_path / "a" / "b" / "locks"
    old = os.umask(0)
    try:
        prepare(lock_dir, "--prewarm-lock-dir")
        again = prepare(lock_dir, "--prewarm-lock-dir")  # the next run's checks pass too
    finally:
        os.umask(old)

    assert again == lock_dir
    for made in (tmp_path / "a", tmp_path / "a" / "b", lock_dir):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    check_at_start(lock_dir, "--prewarm-lock-dir")


def test_marking_a_lock_dir_on_a_disk_without_inodes_is_a_clear_error(tmpfs: Tmpfs):
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    lock_dir = disk / "locks"
    lock_dir.mkdir(mode=0o700)
    mine = use_up_inodes(disk)

    with pytest.raises(LockDirError) as info:
        prepare(lock_dir, "--prewarm-lock-dir")

    assert str(info.value).startswith(
        f"lock dir {str(lock_dir)!r} is not writable: No space left on device (the "
        f"filesystem is full) (while marking it as pytest-prewarm's with {TAG_FILE}); pass "
        "a writable directory with --prewarm-lock-dir"
    )
    assert list(lock_dir.iterdir()) == []
    assert all(path.exists() for path in mine)


def test_with_one_inode_left_the_tag_cannot_be_linked_into_place_and_says_so(tmpfs: Tmpfs):
    # On tmpfs a hard link takes an inode of its own: the tag's temporary file gets the
    # last one, the link is refused, and so is the exclusive create that stands in for it.
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    lock_dir = disk / "locks"
    lock_dir.mkdir(mode=0o700)
    use_up_inodes(disk).pop().unlink()

    with pytest.raises(LockDirError, match=r"No space left on device \(the filesystem is full\)"):
        prepare(lock_dir, "--prewarm-lock-dir")

    assert list(lock_dir.iterdir()) == []  # neither the tag nor its temporary file


# -- proving that the lock dir is writable --------------------------------------------------


def test_a_full_disk_is_made_room_on_by_emptying_the_lock_dirs_own_trash(tmpfs: Tmpfs):
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    lock_dir = prepare(disk / "locks", "--prewarm-lock-dir")
    Layout(lock_dir).ensure()
    left = Layout(lock_dir).trash / "staging.0123abcd"  # a run cut short left its trash
    (left / "data").mkdir(parents=True)
    (left / "data" / "file").write_text("x")
    mine = use_up_inodes(disk)

    assert prepare(lock_dir, "--prewarm-lock-dir") == lock_dir

    assert list(Layout(lock_dir).trash.iterdir()) == []
    assert all(path.exists() for path in mine)  # what is not the lock dir's stays


def test_a_full_disk_without_trash_to_remove_is_a_clear_error(tmpfs: Tmpfs):
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    lock_dir = prepare(disk / "locks", "ini")
    use_up_inodes(disk)

    with pytest.raises(LockDirError) as info:
        prepare(lock_dir, "ini")

    assert str(info.value) == (
        f"lock dir {str(lock_dir)!r} is not writable: No space left on device (the "
        "filesystem is full); pass a writable directory with --prewarm-lock-dir (a new or "
        f"empty one, or one pytest-prewarm made; value {str(lock_dir)!r} came from ini)"
    )


def test_a_trash_that_is_a_symlink_is_not_emptied_to_make_room(tmpfs: Tmpfs, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    lock_dir = prepare(disk / "locks", "ini")
    Layout(lock_dir).trash.symlink_to(victim, target_is_directory=True)
    use_up_inodes(disk)

    with pytest.raises(LockDirError, match="No space left on device"):
        prepare(lock_dir, "ini")

    assert (victim / "precious.txt").read_text() == "mine"


def test_a_read_only_lock_dir_is_a_clear_error(tmpfs: Tmpfs):
    disk = tmpfs.mount("size=1m")
    lock_dir = prepare(disk / "locks", "ini")
    tmpfs.remount(disk, "ro")

    with pytest.raises(LockDirError) as info:
        prepare(lock_dir, "ini")

    assert str(info.value).startswith(
        f"lock dir {str(lock_dir)!r} is not writable: Read-only file system; pass"
    )


# -- the lock mode --------------------------------------------------------------------------


def test_auto_mode_takes_leases_where_no_probe_file_can_be_made(tmpfs: Tmpfs):
    disk = tmpfs.mount("size=1m")
    lock_dir = prepare(disk / "locks", "ini")
    tmpfs.remount(disk, "ro")

    assert choose_lock_mode(lock_dir, "auto") == (
        LockMode.LEASE,
        "auto: cannot create a probe file (Read-only file system)",
    )


def test_the_first_run_pins_the_mode_and_a_run_in_the_other_mode_is_refused(tmp_path):
    lock_dir = prepare(tmp_path / "locks", "ini")
    pin_mode(lock_dir, LockMode.FLOCK, "requested")
    pin_mode(lock_dir, LockMode.FLOCK, "auto: ext4 filesystem supports flock")  # agrees

    with pytest.raises(LockDirError) as info:
        pin_mode(lock_dir, LockMode.LEASE, "requested")

    assert str(info.value) == (
        f"lock dir {str(lock_dir)!r} is used in flock mode, but this run would use lease "
        "mode (requested); the two do not exclude each other. Pass --prewarm-lock-mode "
        "flock, or use another --prewarm-lock-dir"
    )
    assert (lock_dir / "lock-mode").read_text() == "flock\n"


def test_pinning_the_mode_on_a_disk_with_one_inode_left_is_a_clear_error(tmpfs: Tmpfs):
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    lock_dir = prepare(disk / "locks", "ini")
    use_up_inodes(disk).pop().unlink()  # the probe of writability fits; the mode file not

    with pytest.raises(LockDirError, match="No space left on device"):
        pin_mode(lock_dir, LockMode.FLOCK, "requested")


def test_a_mode_file_of_garbage_is_refused_clipped_and_escaped(tmp_path: Path) -> None:
    lock_dir = prepare(tmp_path / "locks", "ini")
    garbage = "\x1b]0;owned\x07" + "x" * 60000
    Layout(lock_dir).mode_file.write_text(garbage)

    with pytest.raises(LockDirError) as info:
        pin_mode(lock_dir, LockMode.FLOCK, "requested")

    said = str(info.value)
    assert said.startswith(f"{Layout(lock_dir).mode_file} holds '\\x1b]0;owned\\x07xxx")
    assert "(clipped), not a lock mode (flock or lease); nothing was changed" in said
    assert "\x1b" not in said
    assert len(said) < 400
    assert "--prewarm-lock-mode" not in said
    assert Layout(lock_dir).mode_file.read_text() == garbage


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_mode_file_that_is_not_ours_is_refused_and_left_alone(tmp_path, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("lease\n")
    lock_dir = prepare(tmp_path / "locks", "ini")
    mode_file = Layout(lock_dir).mode_file
    if kind == "symlink":
        mode_file.symlink_to(victim)
    else:
        mode_file.mkdir()

    with pytest.raises(LockDirError) as info:
        pin_mode(lock_dir, LockMode.FLOCK, "requested")

    assert str(info.value).startswith(
        f"{mode_file} is not a lock-mode file of this user (a symlink, a special file or "
        "another user's file); nothing was changed."
    )
    assert victim.read_text() == "lease\n"
    assert os.path.islink(mode_file) if kind == "symlink" else mode_file.is_dir()


# -- per-run lock dirs ----------------------------------------------------------------------


def create_run_dir(run_id: str) -> Path:
    """This run's default lock dir, made as the first request of a run makes it."""
    path = run_dir_path(run_id)
    open_run_dir(path, run_id, os.getpid())
    return path


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp dir, for this test: tempfile.gettempdir() answers ``tmp_path/temp``."""
    root = tmp_path / "temp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_per_run_dir_is_owner_only_tagged_and_names_its_creator(temp_root):
    path = create_run_dir("run-1")

    assert path.parent == temp_root
    assert path.name.startswith(RUN_DIR_PREFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert (path / TAG_FILE).is_file()
    assert '"run_id": "run-1"' in Layout(path).run_record.read_text()
    remove_run_dir(path)
    assert not path.exists()


def test_a_temp_dir_where_no_per_run_dir_can_be_made_is_a_clear_error(tmp_path, monkeypatch):
    below_a_file = tmp_path / "file" / "temp"
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(below_a_file))

    with pytest.raises(LockDirError) as info:
        create_run_dir("run-1")

    assert str(info.value) == (
        f"cannot create a per-run lock dir in {below_a_file}: Not a directory; free space "
        "there, set TMPDIR, or pass --prewarm-lock-dir"
    )


def test_a_full_temp_dir_says_the_filesystem_is_full(tmpfs: Tmpfs, monkeypatch):
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    fill_up(disk)
    use_up_inodes(disk)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))

    with pytest.raises(LockDirError, match=r"No space left on device \(the filesystem is full\)"):
        create_run_dir("run-1")


def test_the_sweep_leaves_alone_what_is_not_a_dead_runs_tagged_dir(temp_root):
    untagged = temp_root / f"{RUN_DIR_PREFIX}untagged"
    untagged.mkdir(mode=0o700)
    Layout(untagged).run_record.write_text(own_record("main", "run").to_json())
    a_file = temp_root / f"{RUN_DIR_PREFIX}file"
    a_file.write_text("mine")
    a_link = temp_root / f"{RUN_DIR_PREFIX}link"
    a_link.symlink_to(untagged, target_is_directory=True)
    live = create_run_dir("live-run")  # this process: alive
    other_name = temp_root / "pytest-of-root"
    other_name.mkdir()

    assert sweep_orphans(temp_root) == []

    assert sorted(p.name for p in temp_root.iterdir()) == sorted(
        [untagged.name, a_file.name, a_link.name, live.name, other_name.name]
    )
