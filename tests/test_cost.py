"""A run that asks for no template costs nothing; the first request still does everything.

Start-up imports no core module and touches no file; the lock dir, its mode pin and the
store are made on the first template request, in whichever process comes first. The
per-run default lock dirs of the last few runs stay behind for inspection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import env_without_leaks, linux_proc_only

from pytest_prewarm.exceptions import LockDirError
from pytest_prewarm.layout import MODE_FILE, RUN_RECORD, TAG_FILE
from pytest_prewarm.lockdir import (
    check_at_start,
    open_run_dir,
    read_pin,
    sweep_orphans,
)
from pytest_prewarm.owner import read_record
from pytest_prewarm.rundir import RUN_DIR_PREFIX

UNUSED = """
    def test_one():
        pass


    def test_two(tmp_path_factory):
        assert tmp_path_factory is not None
"""

USES = """
    import os
    from pathlib import Path


    def build(path):
        (path / "data.txt").write_text("built")


    def test_a(prewarmed_template):
        template = prewarmed_template("db", build)
        assert (template / "data.txt").read_text() == "built"
        Path(os.environ["WHERE"]).write_text(os.fspath(template))


    def test_b(prewarmed_template):
        assert (prewarmed_template("db", build) / "data.txt").read_text() == "built"
"""


def run_inner(
    suite_dir: Path, temp_root: Path, *args: str, bound: float = 90
) -> subprocess.CompletedProcess[str]:
    env = env_without_leaks()
    env.update(TMPDIR=str(temp_root), WHERE=str(suite_dir / "where.txt"))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=suite_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=bound,
        check=False,
    )


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(suite dir, empty temp root that the inner run takes as its TMPDIR)."""
    suite_dir = tmp_path / "suite"
    suite_dir.mkdir()
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    return suite_dir, temp_root


def write(suite_dir: Path, source: str) -> None:
    (suite_dir / "test_it.py").write_text(textwrap.dedent(source))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- a run that asks for no template ------------------------------------------------------


@pytest.mark.parametrize("eager", ["--prewarm-eager", "--no-prewarm-eager"])
def test_a_directory_named_prewarm_is_not_a_marker(layout, eager):
    # "prewarm" is then a keyword of every test below it: it asks for no template, so
    # nothing is created, and no eager walk starts with nothing to build.
    suite_dir, temp_root = layout
    (suite_dir / "prewarm").mkdir()
    (suite_dir / "prewarm" / "test_x.py").write_text("def test_plain():\n    pass\n")
    lock_dir = suite_dir / "locks"

    result = run_inner(suite_dir, temp_root, eager, f"--prewarm-lock-dir={lock_dir}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "INTERNALERROR" not in result.stdout + result.stderr
    assert not lock_dir.exists()
    assert tree(temp_root) == []


def package_modules_after(imports: str) -> list[str]:
    """The pytest_prewarm modules a fresh interpreter has loaded after ``import <imports>``."""
    code = (
        f"import sys, {imports}\n"
        "print(sorted(m for m in sys.modules if m.startswith('pytest_prewarm')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.replace("'", '"'))


def test_the_request_machinery_loads_no_teardown_module() -> None:
    # Only a template with a teardown pays for the teardown, reaper and services modules.
    loaded = package_modules_after("pytest_prewarm.request, pytest_prewarm.state")
    assert "pytest_prewarm.request" in loaded
    assert not {
        "pytest_prewarm.teardown",
        "pytest_prewarm.reaper",
        "pytest_prewarm.services",
    } & set(loaded)


def test_importing_the_plugin_loads_no_core_module() -> None:
    assert package_modules_after("pytest, pytest_prewarm.plugin") == [
        "pytest_prewarm",
        "pytest_prewarm._version",
        "pytest_prewarm.console",
        "pytest_prewarm.plugin",
    ]


def test_a_run_without_templates_creates_nothing_and_prints_no_header(layout):
    # (A test that takes the prewarmed_template fixture asks for templates: its setup
    # makes the lock dir, so that the first call goes straight to the lock.)
    suite_dir, temp_root = layout
    write(suite_dir, UNUSED)

    result = run_inner(suite_dir, temp_root, "-p", "no:xdist")

    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(temp_root) == []  # no lock dir, no probe file, nothing
    assert not [line for line in result.stdout.splitlines() if line.startswith("prewarm")]
    assert "prewarm summary" not in result.stdout


def test_a_run_without_templates_under_xdist_creates_no_lock_dir(layout):
    suite_dir, temp_root = layout
    write(suite_dir, UNUSED)

    result = run_inner(suite_dir, temp_root, "-n", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    # xdist's workers make pytest's own basetemp; nothing of ours is there.
    assert [p for p in tree(temp_root) if "prewarm" in p] == []
    assert "prewarm: lock dir" not in result.stdout


MODULES_AT_THE_END = """
    import json, os, sys
    from pathlib import Path


    def pytest_unconfigure(config):
        who = os.environ.get("PYTEST_XDIST_WORKER", "controller")
        loaded = sorted(m for m in sys.modules if m.startswith("pytest_prewarm."))
        Path(os.environ["WHERE"]).with_name(who + ".json").write_text(json.dumps(loaded))
"""


def test_no_process_of_an_xdist_run_without_templates_loads_the_core(layout):
    # The controller names the lock dir's path for its workers and takes their (empty)
    # reports in every xdist run: neither may load the lock dir code or the event log.
    suite_dir, temp_root = layout
    write(suite_dir, UNUSED)
    (suite_dir / "conftest.py").write_text(textwrap.dedent(MODULES_AT_THE_END))

    result = run_inner(suite_dir, temp_root, "-n", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    start_up = {"_version", "clock", "config", "console", "plugin", "state"}
    loaded = {p.stem: json.loads(p.read_text()) for p in suite_dir.glob("*.json")}
    assert sorted(loaded) == ["controller", "gw0", "gw1"]
    for who, modules in loaded.items():
        extra = {m.removeprefix("pytest_prewarm.") for m in modules} - start_up
        assert extra <= ({"rundir"} if who == "controller" else set()), (who, extra)


def test_an_explicit_lock_dir_is_checked_at_start_up_but_made_on_first_use(layout):
    suite_dir, temp_root = layout
    write(suite_dir, UNUSED)
    lock_dir = suite_dir / "new" / "locks"

    unused = run_inner(suite_dir, temp_root, "-n", "2", f"--prewarm-lock-dir={lock_dir}", "-v")

    assert unused.returncode == 0, unused.stdout + unused.stderr
    assert not (suite_dir / "new").exists()
    assert f"prewarm: lock dir {lock_dir} (--prewarm-lock-dir), lock mode auto" in unused.stdout
    write(suite_dir, USES)
    used = run_inner(suite_dir, temp_root, "-n", "2", f"--prewarm-lock-dir={lock_dir}")
    assert used.returncode == 0, used.stdout + used.stderr
    assert (lock_dir / TAG_FILE).is_file()
    assert read_pin(lock_dir) is not None


# -- the first request does all of it, in every mode --------------------------------------


@pytest.mark.parametrize("mode", ["auto", "flock", "lease"])
@pytest.mark.parametrize("workers", ["0", "3"])
def test_the_first_request_prepares_the_default_lock_dir(layout, mode, workers):
    suite_dir, temp_root = layout
    write(suite_dir, USES)

    result = run_inner(suite_dir, temp_root, "-n", workers, f"--prewarm-lock-mode={mode}")

    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = temp_root.glob(f"{RUN_DIR_PREFIX}*")
    template = Path((suite_dir / "where.txt").read_text())
    assert template.is_relative_to(run_dir / "templates")
    assert (template / "data.txt").read_text() == "built"  # kept after the run
    expected = "lease" if mode == "lease" else "flock"
    assert read_pin(run_dir) == expected
    # The run record names the controller, which outlived every worker, not a worker.
    record = read_record(run_dir / RUN_RECORD)
    assert record is not None
    assert record.worker == "main"
    summary = result.stdout
    assert f"prewarm: lock dir {run_dir} (per-run default), lock mode {expected}" in summary
    assert f"prewarm: this run's templates stay in {run_dir}" in summary


LOADED_BY_THE_BUILDER = """
    import json, os, sys
    from pathlib import Path

    def loaded():
        return {name: name in sys.modules for name in ("psutil", "filelock")}

    BEFORE = loaded()  # at collection: what pytest and its plugins loaded

    def build(path):
        # The builder's first request has taken the lock and named itself by now.
        # pytest imported the entry point (with _version and console) before our hook ran.
        early = {"pytest_prewarm._version", "pytest_prewarm.console", "pytest_prewarm.plugin"}
        loaders = {type(sys.modules[name].__loader__).__name__ for name in sys.modules
                   if name.startswith("pytest_prewarm.") and name not in early}
        Path(os.environ["WHERE"]).write_text(
            json.dumps({"before": BEFORE, "build": loaded(), "loaders": sorted(loaders)})
        )
        (path / "data.txt").write_text("built")

    def test_a(prewarmed_template):
        assert (prewarmed_template("db", build) / "data.txt").read_text() == "built"
"""


@linux_proc_only("that the builder needs neither psutil nor filelock where fcntl and /proc are")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux has fcntl and /proc")
@pytest.mark.parametrize("workers", ["0", "2"])
def test_the_builder_takes_the_lock_without_psutil_filelock_or_assertion_rewriting(layout, workers):
    # Both cost 25 ms of CPU together in every process before it could start building; on
    # Linux a raw flock and /proc give the same lock and the same owner record.
    suite_dir, temp_root = layout
    write(suite_dir, LOADED_BY_THE_BUILDER)

    result = run_inner(suite_dir, temp_root, "-n", workers)  # lock mode auto: the default

    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads((suite_dir / "where.txt").read_text())
    assert seen["before"] == {"psutil": False, "filelock": False}  # else this proves nothing
    assert seen["build"] == {"psutil": False, "filelock": False}
    # and by Python's own importer: pytest's assertion rewriter doubled these imports' cost.
    assert seen["loaders"] == ["SourceFileLoader"]


SEEN_AT_FIRST_SETUP = """
    import json, os, sys
    from pathlib import Path


    def pytest_runtest_setup(item):
        seen = Path(os.environ["WHERE"]).with_name(
            os.environ.get("PYTEST_XDIST_WORKER", "main") + ".json"
        )
        if not seen.exists():  # this process's first test, before its fixtures
            temp = Path(os.environ["TMPDIR"])
            made = sorted(p.name for p in temp.iterdir() if "prewarm" in p.name)
            core = "pytest_prewarm.request" in sys.modules
            seen.write_text(json.dumps({"core": core, "made": made}))


    def pytest_unconfigure(config):
        if config.option.collectonly:
            Path(os.environ["WHERE"]).with_name("co.json").write_text(
                json.dumps({"core": "pytest_prewarm.request" in sys.modules})
            )
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_suite_that_uses_the_fixture_loads_the_core_at_collection_and_makes_nothing(
    layout, workers
):
    # Loaded in the first request, the core's imports were paid by every worker at once on
    # the way to the lock; a process about to run tests that use the fixture loads them at
    # the end of its collection instead. Loading makes nothing: the fixture's setup does.
    suite_dir, temp_root = layout
    write(suite_dir, USES)
    (suite_dir / "conftest.py").write_text(textwrap.dedent(SEEN_AT_FIRST_SETUP))

    result = run_inner(suite_dir, temp_root, "-n", workers)

    assert result.returncode == 0, result.stdout + result.stderr
    seen = [json.loads(p.read_text()) for p in suite_dir.glob("*.json") if p.name != "co.json"]
    assert len(seen) == (1 if workers == "0" else 2)
    assert all(s["core"] for s in seen), seen
    if workers == "0":  # (under xdist the other worker's setup may have made it by then)
        assert seen[0]["made"] == []


def test_collecting_or_running_tests_that_do_not_use_the_fixture_loads_no_core(layout):
    suite_dir, temp_root = layout
    (suite_dir / "conftest.py").write_text(textwrap.dedent(SEEN_AT_FIRST_SETUP))
    write(suite_dir, UNUSED)
    result = run_inner(suite_dir, temp_root, "-p", "no:xdist")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((suite_dir / "main.json").read_text()) == {"core": False, "made": []}

    write(suite_dir, USES)  # --collect-only runs no test: nothing to load the core for
    result = run_inner(suite_dir, temp_root, "-p", "no:xdist", "--co")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((suite_dir / "co.json").read_text()) == {"core": False}


def test_processes_that_open_one_run_dir_together_all_get_it_whole(tmp_path):
    # Eight processes race to be first; each must end with the tag and the run record.
    path = tmp_path / f"{RUN_DIR_PREFIX}race"
    code = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from pytest_prewarm.lockdir import open_run_dir
        from pytest_prewarm.layout import TAG_FILE, RUN_RECORD
        go = Path(sys.argv[1])
        while not go.exists():
            pass
        open_run_dir(Path({str(path)!r}), "race", {os.getpid()})
        assert (Path({str(path)!r}) / TAG_FILE).is_file()
        assert (Path({str(path)!r}) / RUN_RECORD).is_file()
        print("ok")
        """
    )
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    go.write_text("")
    outs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8
    assert outs == ["ok\n"] * 8
    record = read_record(path / RUN_RECORD)
    assert record is not None
    assert record.pid == os.getpid()


def test_a_run_dir_name_taken_by_a_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    path = tmp_path / f"{RUN_DIR_PREFIX}taken"
    path.symlink_to(target)

    with pytest.raises(LockDirError, match="is a symbolic link"):
        open_run_dir(path, "taken", os.getpid())
    assert list(target.iterdir()) == []


def test_the_start_up_check_refuses_without_creating(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(LockDirError, match="exists and is not a directory"):
        check_at_start(a_file, "--prewarm-lock-dir")
    with pytest.raises(LockDirError, match="cannot create lock dir"):
        check_at_start(a_file / "below", "--prewarm-lock-dir")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LockDirError, match="is not empty"):
        check_at_start(foreign, "--prewarm-lock-dir")
    check_at_start(tmp_path / "new" / "deeper", "--prewarm-lock-dir")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    check_at_start(tmp_path / "empty", "--prewarm-lock-dir")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores mode bits")
def test_the_start_up_check_refuses_an_unwritable_parent(tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)
    with pytest.raises(LockDirError, match="is not writable"):
        check_at_start(parent / "locks", "--prewarm-lock-dir")


# -- the last runs' default lock dirs stay inspectable -------------------------------------


def test_the_last_three_runs_default_lock_dirs_are_kept_and_older_ones_removed(layout):
    suite_dir, temp_root = layout
    write(suite_dir, USES)
    # Not ours to remove: another tool's dir with our prefix and no tag, and a tagged dir
    # whose creator is alive (this process).
    untagged = temp_root / f"{RUN_DIR_PREFIX}not-ours"
    untagged.mkdir()
    alive = temp_root / f"{RUN_DIR_PREFIX}alive"
    open_run_dir(alive, "alive", os.getpid())

    templates = []
    for _ in range(4):
        result = run_inner(suite_dir, temp_root, "-p", "no:xdist")
        assert result.returncode == 0, result.stdout + result.stderr
        templates.append(Path((suite_dir / "where.txt").read_text()))
        assert f"prewarm: this run's templates stay in {templates[-1].parents[3]}" in (
            result.stdout
        )

    assert not templates[0].parents[3].exists()  # the fourth-oldest is gone
    for template in templates[1:]:
        assert (template / "data.txt").read_text() == "built"
    assert untagged.is_dir()
    assert alive.is_dir()
    assert sorted(temp_root.glob(f"{RUN_DIR_PREFIX}*")) == sorted(
        [untagged, alive, *(t.parents[3] for t in templates[1:])]
    )


def test_keep_runs_zero_removes_the_dir_at_the_end_of_its_run(layout):
    suite_dir, temp_root = layout
    write(suite_dir, USES)

    result = run_inner(suite_dir, temp_root, "-p", "no:xdist", "--prewarm-keep-runs=0")

    assert result.returncode == 0, result.stdout + result.stderr
    assert list(temp_root.glob(f"{RUN_DIR_PREFIX}*")) == []
    assert "templates stay in" not in result.stdout


def test_a_bad_keep_runs_value_is_a_usage_error(layout):
    suite_dir, temp_root = layout
    write(suite_dir, UNUSED)

    result = run_inner(suite_dir, temp_root, "--prewarm-keep-runs=-1")

    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "'-1' from --prewarm-keep-runs is not valid" in result.stderr


def ended_runs(temp_root: Path, count: int) -> list[Path]:
    """``count`` default dirs of runs that ended, oldest first."""
    dead = []
    for index in range(count):
        path = temp_root / f"{RUN_DIR_PREFIX}{index}"
        # A pid that cannot be alive: a real process that has exited and been reaped.
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        open_run_dir(path, str(index), os.getpid())
        os.utime(path / RUN_RECORD, (1000 + index, 1000 + index))
        dead.append(path)
        _rewrite_pid(path / RUN_RECORD, child.pid)
    return dead


def test_the_sweep_keeps_the_newest_ended_runs(tmp_path):
    dead = ended_runs(tmp_path, 5)

    removed = sweep_orphans(tmp_path, keep=2)

    assert sorted(removed) == sorted(dead[:3])
    assert [p.exists() for p in dead] == [False, False, False, True, True]
    assert (dead[4] / MODE_FILE).exists() is False  # untouched: nothing added either


def test_a_dir_kept_for_a_recent_log_is_not_one_of_the_runs_kept(tmp_path):
    dead = ended_runs(tmp_path, 4)
    # The newest run's build failed an hour ago: its log is kept, its dir with it.
    (dead[3] / "failures" / "db.1234").mkdir(parents=True)
    (dead[3] / "failures" / "db.1234" / "run.log").write_text("the error\n")
    # An older run's log is two days old, and another's "log" is a link to a fresh file
    # outside (never followed): neither keeps its dir.
    fresh_outside = tmp_path / "elsewhere.log"
    fresh_outside.write_text("not ours\n")
    (dead[1] / "failures" / "db.1234").mkdir(parents=True)
    old_log = dead[1] / "failures" / "db.1234" / "run.log"
    old_log.write_text("old\n")
    two_days_ago = old_log.stat().st_mtime - 2 * 24 * 3600
    os.utime(old_log, (two_days_ago, two_days_ago))
    (dead[0] / "failures").mkdir()
    (dead[0] / "failures" / "db.1234").symlink_to(tmp_path, target_is_directory=True)

    removed = sweep_orphans(tmp_path, keep=1)

    # Kept: the log holder, and the newest of the others (run 2); runs 0 and 1 go.
    assert sorted(removed) == sorted(dead[:2])
    assert [p.exists() for p in dead] == [False, False, True, True]
    assert fresh_outside.read_text() == "not ours\n"


def test_a_dir_kept_for_a_recent_log_keeps_nothing_else_once_its_run_ended(tmp_path):
    (failed,) = ended_runs(tmp_path, 1)
    (failed / "failures" / "db.1234").mkdir(parents=True)
    (failed / "failures" / "db.1234" / "run.log").write_text("the error\n")
    (failed / "templates" / "big.5678" / "data").mkdir(parents=True)  # gigabytes, say
    (failed / "templates" / "big.5678" / "data" / "blob").write_bytes(b"x" * 4096)
    (failed / "events").mkdir()
    outside = tmp_path / "outside"  # a planted link to it is removed, never followed
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours\n")
    (failed / "templates" / "planted").symlink_to(outside, target_is_directory=True)
    os.mkfifo(failed / "events" / "planted-fifo")

    assert sweep_orphans(tmp_path, keep=3) == []

    assert sorted(p.name for p in failed.iterdir()) == [RUN_RECORD, TAG_FILE, "failures"]
    assert (failed / "failures" / "db.1234" / "run.log").read_text() == "the error\n"
    assert (outside / "keep.txt").read_text() == "not ours\n"


def test_a_fifo_a_link_or_a_dir_named_like_a_log_keeps_no_dir_and_blocks_nothing(tmp_path):
    dead = ended_runs(tmp_path, 4)
    for run in dead:
        (run / "failures" / "db.1234").mkdir(parents=True)
    os.mkfifo(dead[0] / "failures" / "db.1234" / "run.log")  # opening it would block
    fresh_outside = tmp_path / "elsewhere.txt"
    fresh_outside.write_text("not ours\n")
    (dead[1] / "failures" / "db.1234" / "run.log").symlink_to(fresh_outside)
    (dead[2] / "failures" / "db.1234" / "run.log").mkdir()
    (dead[3] / "failures" / "db.1234" / "run.log").write_text("the error\n")

    removed = sweep_orphans(tmp_path, keep=0)

    assert sorted(removed) == sorted(dead[:3])  # only a real, recent log keeps its dir
    assert (dead[3] / "failures" / "db.1234" / "run.log").read_text() == "the error\n"
    assert fresh_outside.read_text() == "not ours\n"


def _rewrite_pid(record: Path, pid: int) -> None:
    stamp = record.stat().st_mtime
    data = json.loads(record.read_text())
    data["pid"] = pid
    record.write_text(json.dumps(data))
    os.utime(record, (stamp, stamp))


# -- a run with many waits writes its report quickly --------------------------------------


def test_the_json_report_is_indented_with_its_lists_of_records_on_one_line():
    from pytest_prewarm.events import TemplateEvent
    from pytest_prewarm.report import dumps, to_json

    events = [
        TemplateEvent("db", f"gw{i}", "waited", wait_seconds=0.5, built_by="gw0", pid=i)
        for i in range(3)
    ]
    data = to_json(events, {"lock_dir": "/x"})

    text = dumps(data)

    assert json.loads(text) == data
    assert '  "settings": {\n    "lock_dir": "/x"\n  },' in text
    (events_line,) = [line for line in text.splitlines() if line.startswith('  "events": [')]
    assert json.loads(events_line.split(": ", 1)[1].rstrip(",")) == data["events"]
    assert '      "name": "db",' in text  # a template (it holds lists) is indented
    for value in ({"events": []}, {"a": [[1], [2]]}, {"a": {}}):
        assert json.loads(dumps(value)) == value


def test_an_event_round_trips_through_its_dict():
    from pytest_prewarm.events import TemplateEvent

    event = TemplateEvent("db", "gw1", "built", build_seconds=1.5, recovered_from="gw0")

    data = event.to_dict()

    assert TemplateEvent.from_dict(data) == event
    assert data["outcome"] == "built"
    assert type(data["outcome"]) is str


# -- the mode pin settles every process on one mode ---------------------------------------


def test_auto_takes_the_pinned_mode_without_probing_and_a_request_must_match(tmp_path):
    from pytest_prewarm.kinds import LockMode
    from pytest_prewarm.lockdir import pin_mode, prepare, settle_mode

    lock_dir = prepare(tmp_path / "locks", "test")
    pin_mode(lock_dir, LockMode.LEASE, "requested")

    mode, why = settle_mode(lock_dir, "auto")

    assert mode is LockMode.LEASE
    assert "pinned in the lock dir" in why
    assert settle_mode(lock_dir, "lease") == (LockMode.LEASE, "requested")
    with pytest.raises(LockDirError, match="is used in lease mode, but this run would use flock"):
        settle_mode(lock_dir, "flock")
    assert not list(lock_dir.glob(".prewarm-flock-probe-*"))


def test_processes_settling_a_fresh_lock_dir_together_agree(tmp_path):
    lock_dir = tmp_path / "locks"
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from pytest_prewarm.lockdir import prepare, settle_mode
        go = Path(sys.argv[1])
        while not go.exists():
            pass
        path = prepare(Path({str(lock_dir)!r}), "test")
        print(settle_mode(path, "auto")[0])
        """
    )
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    go.write_text("")
    outs = [proc.communicate(timeout=60)[0] for proc in procs]

    assert [proc.returncode for proc in procs] == [0] * 6
    assert set(outs) == {"flock\n"}
    assert read_pin(lock_dir) == "flock"


MARKED = """
    import pytest
    import pytest_prewarm


    @pytest_prewarm.template("db")
    def build(path):
        (path / "data.txt").write_text("built")


    @pytest.mark.prewarm("db")
    def test_marked(prewarmed):
        assert (prewarmed["db"].path / "data.txt").read_text() == "built"
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_mode_that_disagrees_with_the_pin_is_a_usage_error_at_start_up(layout, workers):
    from pytest_prewarm.kinds import LockMode
    from pytest_prewarm.lockdir import pin_mode, prepare

    suite_dir, temp_root = layout
    write(suite_dir, MARKED)
    (suite_dir / "conftest.py").write_text("")
    lock_dir = prepare(suite_dir / "locks", "test")
    pin_mode(lock_dir, LockMode.LEASE, "requested")

    result = run_inner(
        suite_dir,
        temp_root,
        "-n",
        workers,
        f"--prewarm-lock-dir={lock_dir}",
        "--prewarm-lock-mode=flock",
    )

    # Checked with the lock dir at start-up, before any worker starts: one line, no test run.
    assert result.returncode == 4, result.stdout + result.stderr
    assert (
        "is used in lease mode, but this run asks for flock mode (from --prewarm-lock-mode)"
    ) in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (lock_dir / "templates").exists()


def test_the_lock_modes_the_options_accept_are_the_lock_modes():
    from pytest_prewarm.config import LOCK_MODES
    from pytest_prewarm.kinds import LockMode

    assert tuple(mode.value for mode in LockMode) == LOCK_MODES


def test_a_run_dir_that_cannot_be_made_is_a_lock_dir_error(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    with pytest.raises(LockDirError, match="cannot create a per-run lock dir in"):
        open_run_dir(a_file / f"{RUN_DIR_PREFIX}x", "x", os.getpid())


def test_the_report_names_the_pinned_mode_or_the_requested_one(tmp_path):
    from pytest_prewarm.config import Setting, Settings
    from pytest_prewarm.kinds import LockMode
    from pytest_prewarm.lockdir import pin_mode, prepare
    from pytest_prewarm.state import State

    lock_dir = tmp_path / "locks"
    settings = Settings(
        lock_dir=Setting(lock_dir, "--prewarm-lock-dir"),
        timeout=Setting(30.0, "default"),
        rebuild=False,
        notice_after=Setting(10.0, "default"),
        report_top=10,
        json_path=None,
        lock_mode=Setting("auto", "default"),
        stale_after=Setting(15.0, "default"),
    )
    state = State(settings, run_id="r", worker="main", controller_pid=os.getpid())

    assert state.mode_in_use() == ("auto", "not chosen: no template was used")
    assert not lock_dir.exists()  # asking cost nothing
    pin_mode(prepare(lock_dir, "test"), LockMode.LEASE, "requested")
    assert state.mode_in_use()[0] == "lease"
    assert "pinned in the lock dir" in state.mode_in_use()[1]
    state.reported_mode = ("flock", "auto: ext4 filesystem supports flock")
    assert state.mode_in_use() == ("flock", "auto: ext4 filesystem supports flock")
