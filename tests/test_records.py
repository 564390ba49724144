"""The records a build leaves (meta.json, failure records) and the text of a failed build.

Decoders are strict about types and lenient about absence: whatever another version, a
torn write or a stranger left reads as "no record", never as an exception.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_prewarm import PrewarmBuildError, PrewarmUsageError
from pytest_prewarm.exceptions import PrewarmLockError
from pytest_prewarm.failure import (
    MAX_MESSAGE,
    builder_traceback,
    clip,
    disk_full_hint,
    safe_str,
)
from pytest_prewarm.files import write_atomic
from pytest_prewarm.records import META_FORMAT, Meta, failure_to_json, read_failure
from pytest_prewarm.values import json_round_trip

META = {
    "format": META_FORMAT,
    "name": "db",
    "key": "null",
    "value": {"port": 5432},
    "built_by": "gw0",
    "pid": 1234,
    "run_id": "run",
    "boot_id": None,
    "build_seconds": 1,
    "published_at": 1700000000.5,
    "holder": [1234, 1700000000.0],
    "build": "1234-0badc0de",
    "digest": "sha256:00",
    "data_path": "/locks/templates/db/1234-0badc0de/data",
    "requires": None,
}


def meta_file(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({**META, **changes}))
    return path


def test_meta_reads_back_what_it_wrote(tmp_path):
    meta = Meta.read(meta_file(tmp_path))
    assert meta is not None

    again = tmp_path / "again.json"
    again.write_text(meta.to_json())

    assert Meta.read(again) == meta
    assert meta.build_seconds == 1.0
    assert isinstance(meta.build_seconds, float)
    assert meta.value == {"port": 5432}


@pytest.mark.parametrize(
    "changes",
    [
        {"format": 3},
        {"format": 1},  # format 1 has no build name
        {"build": ""},
        {"build": "../elsewhere"},
        {"digest": 5},
        {"requires": {"base": 1}},
        {"requires": ["base"]},
        {"name": 3},
        {"run_id": None},
        {"boot_id": 7},
        {"pid": "1234"},
        {"pid": True},
        {"build_seconds": "1"},
        {"published_at": None},
        {"holder": {"pid": 1}},
    ],
    ids=repr,
)
def test_a_meta_with_a_field_of_the_wrong_type_reads_as_unpublished(tmp_path, changes):
    assert Meta.read(meta_file(tmp_path, **changes)) is None


def test_a_failure_record_reads_back_whole_and_pickles(tmp_path):
    error = PrewarmBuildError(
        template="db",
        exc_type="ValueError",
        exc_message="bad schema",
        traceback_text="Traceback ...",
        worker="gw1",
        pid=42,
        output="building\n",
        command_stderr="err",
        command_stdout="out",
        log_path="/locks/failures/db/run.log",
    )
    path = tmp_path / "failure.json"
    write_atomic(path, failure_to_json(error))

    again = read_failure(path)

    assert again is not None
    assert str(again) == str(error)
    assert (again.pid, again.log_path, again.command_stderr) == (42, error.log_path, "err")


def test_a_failure_record_of_another_version_reads_with_what_it_has(tmp_path):
    path = tmp_path / "failure.json"
    path.write_text(json.dumps({"template": "db", "pid": "x", "log_path": "", "output": 3}))

    error = read_failure(path)

    assert error is not None
    assert (error.template, error.exc_type, error.worker) == ("db", "<unrecorded>", "<unrecorded>")
    assert (error.pid, error.output, error.log_path) == (0, "", None)
    assert read_failure(tmp_path / "missing.json") is None


def test_an_atomic_write_that_cannot_replace_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "record.json"
    target.mkdir()  # a directory where the record goes: the rename is refused

    with pytest.raises(IsADirectoryError):
        write_atomic(target, "{}")

    assert os.listdir(tmp_path) == ["record.json"]
    assert list(target.iterdir()) == []


# -- the text of a failed build -----------------------------------------------------------------


def test_a_long_text_is_clipped_in_the_middle_saying_how_much_was_left_out():
    text = "a" * 10 + "b" * 5 + "c" * 10

    assert clip(text, 25) == text
    assert clip(text, 20) == "a" * 10 + "\n[... 5 characters left out; the log has them]\n" + (
        "c" * 10
    )
    assert len(clip("x" * (MAX_MESSAGE * 2), MAX_MESSAGE)) < MAX_MESSAGE + 100


def test_an_exception_whose_str_fails_is_still_named():
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert safe_str(Broken()) == "<Broken whose str() failed>"
    assert safe_str(ValueError("fine")) == "fine"


def raise_chain() -> BaseException:
    def inner() -> None:
        raise KeyError("the cause")

    try:
        try:
            inner()
        except KeyError as exc:
            raise ExceptionGroup("several", [ValueError("first"), TypeError("second")]) from exc
    except ExceptionGroup as exc:
        return exc
    raise AssertionError("nothing was raised")


def test_the_builders_traceback_keeps_its_chain_and_the_groups_members():
    text = builder_traceback(raise_chain())

    assert "KeyError: 'the cause'" in text
    assert "in inner" in text
    assert "The above exception was the direct cause" in text
    assert "ValueError: first" in text
    assert "TypeError: second" in text


def test_a_traceback_of_our_frames_only_is_empty():
    # A value that is not JSON is refused by the package itself: nothing of the builder's.
    with pytest.raises(PrewarmUsageError) as info:
        json_round_trip({1, 2}, "db")
    refused = info.value.with_traceback(info.tb.tb_next)  # without this test's own frame

    assert builder_traceback(refused) == ""


def test_a_full_disk_is_named_with_the_lock_dir_and_other_errors_are_not(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")

    assert disk_full_hint(full, tmp_path) == (
        f" (the filesystem holding the lock dir {tmp_path} is full: free space there)"
    )
    assert disk_full_hint(OSError(errno.EACCES, "Permission denied"), tmp_path) == ""
    assert disk_full_hint(ValueError("x"), tmp_path) == ""


def test_a_failing_lock_dir_is_worded_for_a_full_disk_and_for_anything_else(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "locks" / "x"))
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory")

    assert str(PrewarmLockError.lock_dir_failed("db", tmp_path, full)) == (
        f"template 'db': the filesystem holding the lock dir {tmp_path} is full (No space "
        f"left on device ({tmp_path / 'locks' / 'x'})); free space there and run again"
    )
    assert str(PrewarmLockError.lock_dir_failed("db", tmp_path, gone)) == (
        f"template 'db': the lock dir {tmp_path} failed: No such file or directory. Check "
        "that it exists and is writable, or use another --prewarm-lock-dir"
    )
