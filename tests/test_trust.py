"""Is a path ours: the words for what is found instead, and removal that never follows a link."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from pytest_prewarm.trust import dir_problem, kind_of, owner_name, remove_tree, why_unreadable

NO_SUCH_USER = 65533  # a uid with no passwd entry (test_liveness uses it too)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A tree outside the one being removed, with a file and a subdirectory."""
    root = tmp_path / "victim"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "precious.txt").write_text("keep")
    (root / "notes.txt").write_text("mine")
    return root


def planted_tree(tmp_path: Path, victim: Path) -> Path:
    """A tree to remove, holding links to the victim's directory and file at two depths."""
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file.txt").write_text("x")
    (tree / "a" / "to-dir").symlink_to(victim / "sub", target_is_directory=True)
    (tree / "to-file").symlink_to(victim / "notes.txt")
    (tree / "a" / "b" / "to-root").symlink_to(victim, target_is_directory=True)
    return tree


def victim_intact(victim: Path) -> bool:
    return (victim / "sub" / "precious.txt").read_text() == "keep" and (
        victim / "notes.txt"
    ).read_text() == "mine"


# -- removal ----------------------------------------------------------------------------------


def test_a_tree_holding_symlinks_is_removed_without_following_them(tmp_path, victim):
    tree = planted_tree(tmp_path, victim)

    remove_tree(tree)

    assert not os.path.lexists(tree)
    assert victim_intact(victim)


def test_where_rmtree_cannot_resist_symlink_attacks_the_walk_by_hand_follows_no_link(
    tmp_path, victim, monkeypatch
):
    # Windows' rmtree has no fd-based version; the same walk runs here with it switched off.
    monkeypatch.setattr(shutil.rmtree, "avoids_symlink_attacks", False)
    tree = planted_tree(tmp_path, victim)

    remove_tree(tree)

    assert not os.path.lexists(tree)
    assert victim_intact(victim)


def test_a_symlink_given_as_the_tree_is_unlinked_and_its_target_kept(tmp_path, victim):
    link = tmp_path / "link"
    link.symlink_to(victim, target_is_directory=True)

    remove_tree(link)
    remove_tree(tmp_path / "never-existed")

    assert not os.path.lexists(link)
    assert victim_intact(victim)


# -- words for what is there ------------------------------------------------------------------


def test_every_kind_of_file_has_its_words(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    (tmp_path / "file").write_text("")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        modes = {name: os.lstat(tmp_path / name).st_mode for name in os.listdir(tmp_path)}
    modes["dev-null"] = os.stat("/dev/null").st_mode
    modes["no type bits"] = 0o644

    assert {name: kind_of(mode) for name, mode in modes.items()} == {
        "fifo": "a FIFO",
        "link": "a symbolic link",
        "file": "a regular file",
        "sock": "a socket",
        "dev-null": "a character device",
        "no type bits": "a special file",
    }
    assert kind_of(stat.S_IFBLK | 0o600) == "a block device"
    assert kind_of(stat.S_IFDIR | 0o700) == "a directory"


def test_a_uid_without_a_name_is_shown_as_a_number():
    assert owner_name(NO_SUCH_USER) == f"uid {NO_SUCH_USER}"
    assert owner_name(0) == "root (uid 0)"


def test_a_directory_of_a_uid_without_a_name_is_not_ours(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another uid needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NO_SUCH_USER, NO_SUCH_USER)

    assert dir_problem(theirs) == (
        f"{theirs} belongs to uid {NO_SUCH_USER}, not to the user running pytest "
        "(root (uid 0)); mode 0700"
    )


# -- why an owner record could not be read ----------------------------------------------------


def test_why_a_record_is_unreadable_names_what_is_there_instead(tmp_path):
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "torn.json").write_text('{"pid": 12')

    assert why_unreadable(tmp_path / "missing.json") == "no owner record"
    assert why_unreadable(tmp_path / "file" / "below-a-file.json") == (
        "owner record unreadable (Not a directory)"
    )
    assert why_unreadable(tmp_path / "fifo") == (
        f"the owner record {tmp_path / 'fifo'} is a FIFO, not a record"
    )
    assert why_unreadable(tmp_path / "dir") == (
        f"the owner record {tmp_path / 'dir'} is a directory, not a record"
    )
    assert why_unreadable(tmp_path / "torn.json") == (
        "no readable owner record (torn, oversized or not one of ours)"
    )


def test_a_record_of_another_uid_is_not_trusted_and_says_whose_it_is(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another uid needs root")
    record = tmp_path / "owner.json"
    record.write_text("{}")
    os.chown(record, NO_SUCH_USER, NO_SUCH_USER)

    assert why_unreadable(record) == (
        f"the owner record {record} belongs to uid {NO_SUCH_USER}: not trusted"
    )
