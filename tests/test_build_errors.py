"""A failed build explains itself in every worker; a builder's value is JSON or a one-line error.

Every PrewarmBuildError, the builder's and each waiter's, carries the exception, the
traceback once, the tail of what the build wrote (Python prints, subprocesses writing to
the inherited fds) and of a failed subprocess's captured stderr, and the path of a log that
keeps all of it and still exists after the run.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import pytest_prewarm
from pytest_prewarm import PrewarmBuildError
from pytest_prewarm.lockdir import sweep_orphans
from pytest_prewarm.request import LOGS_KEPT, Request, TemplateStore
from pytest_prewarm.rundir import RUN_DIR_PREFIX

PACKAGE_DIR = Path(pytest_prewarm.__file__).resolve().parent
ROOT_CAUSE = 'psql: ERROR: relation "users" does not exist'

# Run by the builder: what a server start-up script writes to the fds it inherits.
ANNOUNCE = """
    import sys

    sys.stderr.write("pg_ctl: server starting (inherited stderr)\\n")
    sys.stdout.write("initdb: cluster ready (inherited stdout)\\n")
"""

# Run by the builder with capture_output=True: the failure's cause is only in its stderr.
MIGRATE = """
    import sys

    print("migrate: applying 0042 to", sys.argv[1])
    sys.stderr.write("psql: ERROR: relation " + '"users"' + " does not exist\\n")
    sys.exit(3)
"""

FAILING_CONFTEST = """
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    import prewarm_probe as probe
    from pytest_prewarm import PrewarmBuildError

    HERE = Path(__file__).resolve().parent
    EXPECT = int(os.environ.get("PREWARM_TEST_EXPECT", "1"))


    def build(path):
        probe.count_attempt(path, test=os.environ.get("PYTEST_CURRENT_TEST", ""))
        probe.wait_for_requests(EXPECT)  # every worker is waiting while this fails
        for i in range(60):
            print(f"noise line {i:03d}")
        print("python print: loading fixtures into the schema")
        subprocess.run([sys.executable, str(HERE / "announce.py")], check=True)
        subprocess.run(
            [sys.executable, str(HERE / "migrate.py"), str(path)],
            check=True,
            capture_output=True,
        )


    @pytest.fixture
    def db(prewarmed_template):
        probe.announce_request()
        try:
            return prewarmed_template("db", build)
        except PrewarmBuildError as error:
            log = error.log_path
            probe.record(
                "error",
                text=str(error),
                output=error.output,
                command_stderr=error.command_stderr,
                command_stdout=error.command_stdout,
                traceback=error.traceback_text,
                log_path=log,
                log_existed=log is not None and Path(log).is_file(),
                built_pid=error.pid,
                test=os.environ["PYTEST_CURRENT_TEST"],
            )
            raise
"""

FAILING_TESTS = """
    import os

    import pytest

    COUNT = int(os.environ.get("PREWARM_TEST_COUNT", "2"))


    @pytest.mark.parametrize("i", range(COUNT))
    def test_uses_db(db, i):
        pass
"""


def section_of(lines: list[str], test: str) -> list[str]:
    """The lines pytest printed for ``test``'s error, from its header to the next one."""
    header = re.compile(r"^_+ ERROR at setup of (\S+) _+$")
    start = next(i for i, line in enumerate(lines) if (m := header.match(line)) and m[1] == test)
    end = next(
        i
        for i in range(start + 1, len(lines))
        if header.match(lines[i]) or lines[i].startswith("====")
    )
    return lines[start:end]


def test_every_worker_shows_the_cause_output_and_log_of_a_failed_build(suite):
    suite.write(conftest=FAILING_CONFTEST, test_db=FAILING_TESTS, announce=ANNOUNCE)
    suite.write(migrate=MIGRATE)

    result = suite.run(
        "-n", "3", env={"PREWARM_TEST_EXPECT": "3", "PREWARM_TEST_COUNT": "6"}, timeout=150
    )

    result.assert_outcomes(errors=6)
    (attempt,) = suite.attempts()
    errors = suite.records("error")
    assert len(errors) == 6
    assert {e["worker"] for e in errors} == {"gw0", "gw1", "gw2"}
    waiters = {e["pid"] for e in errors} - {attempt["pid"]}
    assert len(waiters) == 2  # two other processes, which read the failure record
    # The same error in every process: the builder's own, the waiters', the cached ones.
    assert len({e["text"] for e in errors}) == 1
    error = errors[0]
    text = error["text"]
    lines = text.splitlines()
    assert lines[0].startswith(f"building template 'db' failed in {attempt['worker']} (pid ")
    assert "subprocess.CalledProcessError: Command" in lines[0]
    assert "returned non-zero exit status 3." in lines[0]
    # The root cause, which only the subprocess's captured stderr holds.
    assert error["command_stderr"] == ROOT_CAUSE
    assert f"  {ROOT_CAUSE}" in lines
    assert error["command_stdout"] == "migrate: applying 0042 to <build dir>"
    # What the build wrote: Python prints and subprocesses writing to the inherited fds.
    output = error["output"].splitlines()
    assert output[0] == "[... 33 earlier lines]"  # 63 lines written, the last 30 shown
    assert len(output) == 31
    for line in (
        "python print: loading fixtures into the schema",
        "pg_ctl: server starting (inherited stderr)",
        "initdb: cluster ready (inherited stdout)",
        "noise line 059",
        "noise line 033",
    ):
        assert line in output
        assert f"  {line}" in lines
    assert "noise line 032" not in text
    # The traceback once, without the plugin's frames.
    assert text.count("Traceback (most recent call last):") == 1
    assert error["traceback"] in text
    assert 'conftest.py", line ' in error["traceback"]
    assert str(PACKAGE_DIR) not in text
    # No path the message names is gone: the staging dir is named as <build dir> only.
    assert "/staging/" not in text
    assert "<build dir> is the directory the builder was given" in text
    named = re.findall(re.escape(str(suite.lock_dir)) + r"[^\s'\"]*", text)
    assert named == [error["log_path"]]
    assert lines[-1].endswith(f"Full log: {error['log_path']}")
    log = Path(error["log_path"])
    assert all(e["log_existed"] for e in errors)
    assert log.is_file()  # after the run, too
    assert log.parent == suite.lock_dir / "failures" / Path(attempt["path"]).parents[1].name
    kept = log.read_text()
    for line in (
        "noise line 000",
        "noise line 059",
        "python print: loading fixtures into the schema",
        "pg_ctl: server starting (inherited stderr)",
        "initdb: cluster ready (inherited stdout)",
        ROOT_CAUSE,
        "Traceback (most recent call last):",
        f"migrate: applying 0042 to {attempt['path']}",
    ):
        assert line in kept
    assert not list((suite.lock_dir / "failures").glob(".*.partial"))

    # The builder's own test in pytest's output: the traceback once, nothing chained, and
    # what the build wrote still shown as its captured output (the tee).
    builder_test = attempt["test"].split("::")[-1].split()[0]
    section = section_of(result.outlines, builder_test)
    assert f"[{attempt['worker']}]" in section[1]
    assert sum("Traceback (most recent call last)" in line for line in section) == 1
    assert sum("raise CalledProcessError" in line for line in section) == 1
    assert not any("direct cause" in line or "During handling" in line for line in section)
    assert any(line.startswith("E ") and ROOT_CAUSE in line for line in section)
    captured = section[section.index(next(s for s in section if "Captured stdout setup" in s)) :]
    assert "python print: loading fixtures into the schema" in captured
    assert "initdb: cluster ready (inherited stdout)" in captured
    assert "pg_ctl: server starting (inherited stderr)" in captured
    # A waiter's test shows the same root cause line.
    waiter_test = next(e for e in errors if e["pid"] in waiters)["test"]
    waiter_section = section_of(result.outlines, waiter_test.split("::")[-1].split()[0])
    assert any(line.startswith("E ") and ROOT_CAUSE in line for line in waiter_section)
    assert sum("Traceback (most recent call last)" in line for line in waiter_section) == 1


VALUES_CONFTEST = """
    import pathlib

    import pytest

    import prewarm_probe as probe

    ASKED = probe.HERE / "asked"


    class Server:
        def __repr__(self):
            return "Server(port=5432)"


    def make(kind):
        def build(path):
            probe.count_attempt(path, kind=kind)
            # Both workers run every test in the same order (--dist each): wait for the
            # other one, so one of them is provably a waiter.
            probe.wait_until(lambda: len(list((ASKED / kind).iterdir())) >= 2, what=kind)
            if kind == "path":
                (path / "db.sqlite").write_text("tables")
                return {
                    "db": path / "db.sqlite",
                    "rel": pathlib.PurePosixPath("schema/0042.sql"),
                    "all": [path],
                }
            return {"set": {1, 2, 3}, "object": Server(), "nan": float("nan")}[kind]

        return build


    @pytest.fixture
    def ask(prewarmed_template):
        def ask(kind):
            (ASKED / kind).mkdir(parents=True, exist_ok=True)
            (ASKED / kind / probe.worker()).touch()
            return prewarmed_template(kind, make(kind))

        return ask
"""

VALUES_TESTS = """
    from pathlib import Path

    import pytest

    import prewarm_probe as probe
    from pytest_prewarm import PrewarmBuildError


    def test_path(ask):
        template = ask("path")
        probe.record(
            "value",
            value=template.value,
            path=str(template.path),
            origin=str(template.origin),
            content=Path(template.value["db"]).read_text(),
        )


    @pytest.mark.parametrize("kind", ["set", "object", "nan"])
    def test_not_json(ask, kind):
        with pytest.raises(PrewarmBuildError) as info:
            ask(kind)
        error = info.value
        probe.record(
            "error",
            what=kind,
            text=str(error),
            exc_type=error.exc_type,
            traceback=error.traceback_text,
            log_path=error.log_path,
        )
"""


def test_a_path_value_is_its_published_str_and_other_values_fail_in_one_line(suite):
    suite.write(conftest=VALUES_CONFTEST, test_values=VALUES_TESTS)

    result = suite.run("-n", "2", "--dist", "each")

    result.assert_outcomes(passed=8)  # 4 tests on each of the 2 workers
    assert sorted(a["kind"] for a in suite.attempts()) == ["nan", "object", "path", "set"]
    values = suite.records("value")
    assert {v["worker"] for v in values} == {"gw0", "gw1"}
    # The other worker waited, or (if the build was done before it asked) reused it.
    origins = sorted(v["origin"] for v in values)
    assert origins in (["built", "waited"], ["built", "reused"]), origins
    for value in values:
        published = Path(value["path"])
        assert value["value"] == {
            "db": str(published / "db.sqlite"),  # where it was published, not staged
            "rel": "schema/0042.sql",
            "all": [str(published)],
        }
        assert value["content"] == "tables"
    errors = suite.records("error")
    expected = {
        "set": "returned set {1, 2, 3}, which is not JSON-serialisable; ",
        "object": "returned conftest.Server Server(port=5432), which is not JSON-serialisable; ",
        "nan": "returned float nan, which is not JSON-serialisable (JSON has no NaN",
    }
    assert sorted(e["what"] for e in errors) == ["nan", "nan", "object", "object", "set", "set"]
    for kind, words in expected.items():
        (text,) = {e["text"] for e in errors if e["what"] == kind}  # the same in both workers
        assert {e["worker"] for e in errors if e["what"] == kind} == {"gw0", "gw1"}
        assert len(text.splitlines()) == 1
        assert text.startswith(f"building template {kind!r} failed in gw")
        assert f"PrewarmUsageError: builder of template {kind!r} {words}" in text
        assert "return None, a str, int, float or bool" in text
    for error in errors:
        assert error["exc_type"] == "PrewarmUsageError"
        assert error["traceback"] == ""
        assert error["log_path"] is None
    assert list((suite.lock_dir / "failures").rglob("*.log")) == []


DEFAULT_DIR_CONFTEST = """
    import os

    import pytest

    import prewarm_probe as probe
    from pytest_prewarm import PrewarmBuildError


    def build(path):
        print("about to fail")
        raise RuntimeError("schema.sql not found")


    def test_build_fails(prewarmed_template):
        with pytest.raises(PrewarmBuildError) as info:
            prewarmed_template("db", build)
        probe.record("error", log_path=info.value.log_path, text=str(info.value))
"""


def test_a_per_run_lock_dir_keeps_the_failed_builds_log_for_a_day(suite, tmp_path):
    temp_root = tmp_path / "tmp"  # the inner run's temp dir: no other run sweeps it
    temp_root.mkdir()
    suite.write(test_default=DEFAULT_DIR_CONFTEST)

    # Kept for no run after its end (the default keeps three whole): only the logs stay.
    result = suite.run(
        "-p", "no:xdist", "--prewarm-keep-runs=0", lock_dir=False, env={"TMPDIR": str(temp_root)}
    )

    result.assert_outcomes(passed=1)
    (error,) = suite.records("error")
    log = Path(error["log_path"])
    (run_dir,) = temp_root.iterdir()
    assert run_dir.name.startswith(RUN_DIR_PREFIX)
    assert log.is_relative_to(run_dir)
    assert log.is_file()
    assert "about to fail" in log.read_text()
    assert f"Full log: {log}" in error["text"]
    # All but the failure records, their logs, the tag and the run record is gone.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".run-owner.json",
        "PYTEST_PREWARM_LOCKDIR.TAG",
        "failures",
    ]
    # A later run's sweep keeps it while the log is younger than a day, then removes it.
    assert sweep_orphans(temp_root) == []
    assert log.is_file()
    two_days_ago = log.stat().st_mtime - 2 * 24 * 3600
    os.utime(log, (two_days_ago, two_days_ago))
    assert sweep_orphans(temp_root) == [run_dir]
    assert not run_dir.exists()


# -- In this process: the store driven directly, in this (the main) thread ---------------------


def failing_build(path: Path) -> None:
    print("python print in the build")
    os.write(2, b"written to fd 2\n")
    raise RuntimeError("broken")


def test_the_streams_are_put_back_and_the_newest_logs_of_a_template_are_kept(tmp_path):
    assert threading.current_thread() is threading.main_thread()  # so fds 1/2 are captured
    streams = (sys.stdout, sys.stderr)
    fds = [os.fstat(fd) for fd in (1, 2)]
    logs = []
    for run in range(LOGS_KEPT + 2):
        store = TemplateStore(tmp_path, run_id=f"run-{run}", worker="gw0")
        with pytest.raises(PrewarmBuildError) as info:
            store.get(Request("db", failing_build, None, 30.0))
        assert (sys.stdout, sys.stderr) == streams
        assert [(s.st_dev, s.st_ino) for s in map(os.fstat, (1, 2))] == [
            (s.st_dev, s.st_ino) for s in fds
        ]
        error = info.value
        assert error.output.splitlines() == ["python print in the build", "written to fd 2"]
        assert error.log_path is not None
        logs.append(Path(error.log_path))
        assert logs[-1].is_file()
    kept = sorted((tmp_path / "failures").rglob("*.log"))
    assert kept == sorted(logs[-LOGS_KEPT:])
    assert not list((tmp_path / "failures").glob(".*"))  # no partial log left


def test_a_build_error_with_its_output_survives_pickling():
    error = PrewarmBuildError(
        "db",
        "RuntimeError",
        "boom",
        "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n",
        "gw1",
        42,
        output="[... 3 earlier lines]\nlast line",
        command_stderr=ROOT_CAUSE,
        command_stdout="applied",
        log_path="/l/failures/db/run.log",
    )

    copy: Any = pickle.loads(pickle.dumps(error))

    assert str(copy) == str(error)
    fields = ("output", "command_stderr", "command_stdout", "log_path", "traceback_text")
    assert [getattr(copy, f) for f in fields] == [getattr(error, f) for f in fields]
    assert str(error).splitlines()[-1].endswith("Full log: /l/failures/db/run.log")
    assert f"  {ROOT_CAUSE}" in str(error).splitlines()


EAGER_CONFTEST = """
    import subprocess
    import sys
    import threading

    import pytest_prewarm
    import prewarm_probe as probe


    @pytest_prewarm.template("db")
    def build(path):
        probe.count_attempt(path, thread=threading.current_thread().name)
        restore = probe.HERE / "restore.py"
        subprocess.run([sys.executable, str(restore)], check=True, capture_output=True)
"""

RESTORE = """
    import sys

    sys.stderr.write("pg_restore: " + "dump is corrupt\\n")
    sys.exit(1)
"""

EAGER_TESTS = """
    import pytest


    @pytest.mark.prewarm("db")
    @pytest.mark.parametrize("i", range(4))
    def test_needs_db(i):
        pass
"""


def test_an_eager_builds_failure_carries_the_failed_commands_stderr(suite):
    suite.write(conftest=EAGER_CONFTEST, test_eager=EAGER_TESTS, restore=RESTORE)

    result = suite.run("-n", "2")

    result.assert_outcomes(errors=4)
    (attempt,) = suite.attempts()
    assert attempt["thread"] == "prewarm-eager"
    # Each of the 4 errors shows the message once. From Python 3.12 on, pytest prints it
    # without the "E " prefix when every traceback entry is hidden, so lines are not
    # filtered by it; the short summary shows only the first line of each message.
    errors = result.outlines
    assert sum(line.endswith("    pg_restore: dump is corrupt") for line in errors) == 4
    assert sum(line.endswith("stderr of the failed command:") for line in errors) == 4
    (log,) = (suite.lock_dir / "failures").rglob("*.log")
    assert "pg_restore: dump is corrupt" in log.read_text()
    assert sum(line.endswith(f"Full log: {log}") for line in errors) == 4
