"""A full disk (or one out of inodes) under the events files and the report files.

The events files are a crash-safe copy of what each process did: losing them must never
fail a test or the run. A report the user asked for (--prewarm-json, --prewarm-keys) is
written whole or not at all, and a run that could not write it says so and fails. Every
disk here is a real tmpfs, filled for real; every run is a real pytest in a subprocess.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Suite, Tmpfs, fill_up, use_up_inodes

from pytest_prewarm import console
from pytest_prewarm.events import EventLog, TemplateEvent
from pytest_prewarm.kinds import Outcome
from pytest_prewarm.layout import Layout

CONFTEST = """
    import pytest


    def build(path):
        (path / "f.txt").write_text("hello")


    @pytest.fixture(scope="session")
    def db(prewarmed_template):
        return prewarmed_template("db", build)
"""

TESTS = """
    import pytest


    @pytest.mark.parametrize("i", range(4))
    def test_uses_db(db, i):
        assert (db.path / "f.txt").read_text() == "hello"
"""

STOPPED = "stopped recording its template events in "


def no_crash(out: str) -> None:
    assert "INTERNALERROR" not in out, out
    assert "Traceback" not in out, out
    assert "OSError" not in out, out


def stop_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if STOPPED in line]


def whole_lines(directory: Path) -> list[str]:
    """Every line of every events file under ``directory``; each must parse."""
    lines = []
    for path in sorted(directory.rglob("*.jsonl")):
        text = path.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n"), f"a torn last line in {path}: {text!r}"
        for line in text.splitlines():
            json.loads(line)
            lines.append(line)
    return lines


# Out of inodes at -n 2, whether a worker's probe of the lock dir or its events dir gets
# the last inode is a race; the probe's failure is a clear error of its own (test_lockdir).
@pytest.mark.parametrize(("exhaust", "workers"), [("space", "0"), ("space", "2"), ("inodes", "0")])
def test_a_full_disk_stops_the_events_files_once_and_the_tests_still_pass(
    suite: Suite, tmpfs: Tmpfs, tmp_path: Path, exhaust: str, workers: str
) -> None:
    disk = tmpfs.mount("size=2m,nr_inodes=200")
    lock_dir = disk / "locks"
    suite.write(conftest=CONFTEST, test_full=TESTS)
    lock = ["--prewarm-lock-dir", str(lock_dir)]
    first = suite.run("-n", "0", *lock, lock_dir=False)
    first.assert_outcomes(passed=4)  # the template is published
    if exhaust == "space":
        freed = [fill_up(disk)]
    else:
        # One inode left: the lock dir's probe of writability still passes (it frees what
        # it takes), and the events dir of the run takes the last one.
        freed = use_up_inodes(disk)
        freed.pop().unlink()
    report = tmp_path / "report.json"  # on a disk with room: the events must reach it

    full = suite.run("-n", workers, *lock, "--prewarm-json", str(report), lock_dir=False)

    out = full.stdout.str() + full.stderr.str()
    assert full.ret == 0, out
    full.assert_outcomes(passed=4)
    no_crash(out)
    lines = stop_lines(out)
    senders = [line.split("[prewarm] ", 1)[1].split(" ", 1)[0] for line in lines]
    assert lines, out
    assert len(senders) == len(set(senders)), lines  # once per process, not once per test
    assert set(senders) <= ({"main"} if workers == "0" else {"gw0", "gw1"})
    assert "No space left on device" in lines[0]
    assert f"{lock_dir / 'events'}" in lines[0]
    assert "lose its lock waits and build times" in lines[0]
    assert "free space (or inodes) on that filesystem" in lines[0]
    assert "--prewarm-lock-dir" in lines[0]
    # The events of a process that ended normally still reach the report, from memory.
    data = json.loads(report.read_text())
    assert [t["outcome"] for t in data["templates"]] == ["reused"]
    assert data["events"]
    # Nothing half-written is left for a reader.
    whole_lines(lock_dir)
    assert list(lock_dir.rglob("*.tmp")) == []

    for path in freed:
        path.unlink()
    again = suite.run("-n", "0", *lock, lock_dir=False)  # -n 0: quicker, and as telling
    again_out = again.stdout.str() + again.stderr.str()
    assert again.ret == 0, again_out
    again.assert_outcomes(passed=4)
    assert stop_lines(again_out) == []
    no_crash(again_out)


def event(n: int) -> TemplateEvent:
    return TemplateEvent("db", "gw0", Outcome.WAITED, wait_seconds=float(n), pid=n)


def test_a_flush_on_a_full_disk_leaves_whole_lines_only_and_the_merge_reads_them(
    tmpfs: Tmpfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The warning goes to the real stderr (console.py), which capfd does not see: a pipe
    # stands in for it, to count the lines.
    read_end, write_end = os.pipe()
    monkeypatch.setattr(console, "_fd", write_end)
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    layout = Layout(disk / "locks")
    layout.ensure()
    worker = EventLog(layout, "run-1", "gw0")
    worker.record(event(0))
    worker.flush()
    path = layout.events_file("run-1", "gw0", os.getpid())
    kept = path.read_bytes()
    filler = fill_up(disk)
    # The first event took a page of which most is still free: the next batch fits in
    # part (a short write), and the rest is refused.
    for n in range(1, 200):
        worker.record(event(n))

    worker.flush()  # neither a raw OSError nor a torn line
    worker.record(event(200))
    worker.flush()  # stopped: not tried again, nothing raised

    assert worker.write_error is not None
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as pipe:
        said = pipe.read().splitlines()
    assert len(said) == 1, said  # once, not once per flush
    assert f"{STOPPED}{path}: No space left on device" in said[0]
    assert path.read_bytes() == kept
    assert [e.pid for e in worker.events] == list(range(201))  # still in memory
    # A kill between a write and its cut-back can still leave a torn last line: the
    # controller's merge skips it and keeps the whole lines before it.
    filler.unlink()
    with path.open("ab") as handle:
        handle.write(json.dumps(event(7).to_dict()).encode()[:25])
    controller = EventLog(layout, "run-1", "main")
    assert [(e.worker, e.pid) for e in controller.merged()] == [("gw0", 0)]


REPORTS = {
    "json": ["--prewarm-json", "{disk}/out/report.json"],
    "keys": ["--prewarm-keys", "{disk}/out/report.json"],
    "keys-collect-only": ["--prewarm-keys", "{disk}/out/report.json", "--collect-only"],
}


@pytest.mark.parametrize("which", sorted(REPORTS))
def test_a_report_that_cannot_be_written_is_one_clear_error_and_fails_the_run(
    suite: Suite, tmpfs: Tmpfs, which: str
) -> None:
    disk = tmpfs.mount("size=1m,nr_inodes=64")
    report = disk / "out" / "report.json"
    report.parent.mkdir()
    report.write_text("the older report\n")
    args = [a.format(disk=disk) for a in REPORTS[which]]
    option = args[0]
    suite.write(conftest=CONFTEST, test_full=TESTS)
    filler = fill_up(disk)

    full = suite.run("-n", "0", *args)

    out = full.stdout.str() + full.stderr.str()
    no_crash(out)
    assert full.ret == 1, out  # every test passed, but the report asked for is missing
    last = full.stdout.lines[-1]
    assert ("4 tests collected" if "--collect-only" in args else "4 passed") in last, out
    errors = [line for line in out.splitlines() if "cannot write the" in line]
    assert errors == [
        f"prewarm: cannot write the {'JSON report' if which == 'json' else 'template keys'} "
        f"({option}) to {report}: No space left on device. This run's report is not there "
        "(an older file at that path is left as it was); free space on that filesystem or "
        f"give {option} another path"
    ], out
    assert report.read_text() == "the older report\n"  # never emptied nor half-written
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json"]  # no temp left

    filler.unlink()
    again = suite.run("-n", "0", *args)
    assert again.ret == 0, again.stdout.str()
    text = report.read_text()
    if which == "json":
        assert json.loads(text)["templates"][0]["name"] == "db"
    else:  # after a run, the templates it got; --collect-only: those markers name (none)
        assert text.startswith("# pytest-prewarm template keys")
        assert ("\ndb\t" in text) is ("--collect-only" not in args)
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json"]


def test_a_report_path_that_is_a_link_is_written_through(suite: Suite, tmp_path: Path) -> None:
    # The user's link (CI reads the target): a plain open() wrote through it; so must the
    # atomic write, instead of replacing the link with a file of its own.
    real = tmp_path / "reports" / "real.json"
    real.parent.mkdir()
    real.write_text("the older report\n")
    link = tmp_path / "report.json"
    link.symlink_to(real)
    suite.write(conftest=CONFTEST, test_full=TESTS)

    result = suite.run("-n", "0", "--prewarm-json", str(link))

    assert result.ret == 0, result.stdout.str()
    assert link.is_symlink()
    assert json.loads(real.read_text())["templates"][0]["name"] == "db"
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.json"]  # no temp left
