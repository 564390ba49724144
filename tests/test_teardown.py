"""Templates that are running services: one teardown per built instance, after its last user.

Each inner suite starts a real server (``python -m http.server``) with the service helper;
its teardown appends one line to a file and stops the server. The outer test counts the
lines and looks for the server processes with psutil.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Suite, wait_until

pytestmark = pytest.mark.skipif(os.name != "posix", reason="servers are found and killed by pid")

SERVICE_CONFTEST = """
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import pytest

    import prewarm_probe as probe
    import pytest_prewarm
    from pytest_prewarm import services

    TEARDOWNS = Path(__file__).parent / "teardowns.jsonl"
    MODE = os.environ.get("PREWARM_TEST_TEARDOWN", "ok")


    def stop_server(path, value):
        line = {"pid": value["pid"], "at": time.time(), "by": os.getpid(), "path": str(path)}
        line["pgid"] = os.getpgid(0)
        with open(TEARDOWNS, "a") as handle:
            handle.write(json.dumps(line) + "\\n")
        services.stop(value)
        if MODE == "raise":
            raise RuntimeError("the server refused to stop")
        if MODE == "hang":
            time.sleep(600)


    @pytest_prewarm.template("server", teardown=stop_server)
    def build_server(path):
        probe.count_attempt(path)
        port = services.free_port()
        argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        return services.start(argv, path, name="http", port=port)
"""

USE_TESTS = """
    import os
    import time
    import urllib.request

    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(6))
    @pytest.mark.prewarm("server")
    def test_uses_the_server(prewarmed, i):
        value = prewarmed["server"].value
        with urllib.request.urlopen(f"http://127.0.0.1:{value['port']}/") as reply:
            assert reply.status == 200
        if os.environ.get("PREWARM_TEST_FAIL") == str(i):
            raise AssertionError("planned failure")
        probe.record("ran", end=time.time(), server=value["pid"])
"""

OTHER_TESTS = """
    import time

    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(6))
    def test_never_uses_it(i):
        probe.record("other", end=time.time())
"""


def teardowns(suite: Suite) -> list[dict[str, Any]]:
    path = suite.path / "teardowns.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reapers_left(lock_dir: Path) -> list[psutil.Process]:
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "pytest_prewarm.reaper" in cmd and str(lock_dir) in cmd:
            left.append(proc)
    return left


def assert_nothing_left(suite: Suite, pids: set[int]) -> None:
    wait_until(lambda: not [p for p in pids if running(p)], 10, what="the servers to stop")
    wait_until(lambda: not reapers_left(suite.lock_dir), 10, what="the reaper to exit")


def check_once_after_every_test(suite: Suite, run: str = "run") -> dict[str, Any]:
    done = teardowns(suite)
    assert len(done) == 1, done
    ran = suite.records("ran", run)
    assert ran, "no test used the server"
    assert {r["server"] for r in ran} == {done[0]["pid"]}
    assert max(r["end"] for r in ran) < done[0]["at"]
    return done[0]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-p", "no:xdist"], id="no-xdist"),
        pytest.param(["-n", "3"], id="n3"),
        pytest.param(["-n", "3", "--dist", "loadgroup"], id="loadgroup"),
        pytest.param(["-n", "3", "--dist", "worksteal"], id="worksteal"),
        pytest.param(["-n", "3", "--dist", "loadfile"], id="unused-workers"),
    ],
)
def test_one_teardown_after_the_last_test_that_could_use_the_service(
    suite: Suite, args: list[str]
) -> None:
    # With --dist loadfile the server's tests go to one worker: the others never use it.
    suite.write(conftest=SERVICE_CONFTEST, test_use=USE_TESTS, test_other=OTHER_TESTS)

    result = suite.run(*args)

    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["*teardowns:*", "server  teardown by controller: done in *"])
    assert len(suite.attempts()) == 1
    done = check_once_after_every_test(suite)
    assert max(r["end"] for r in suite.records("other")) < done["at"]
    assert_nothing_left(suite, {done["pid"]})
    # The teardown unpublished the template: its value names a server that is gone.
    assert not list((suite.lock_dir / "templates").iterdir())
    assert not (suite.lock_dir / "services").exists() or not list(
        (suite.lock_dir / "services").glob("*/*.json")
    )


@pytest.mark.parametrize("args", [["-x"], ["--maxfail=1"], ["-x", "-n", "2"]])
def test_a_run_stopped_early_still_tears_down_once(suite: Suite, args: list[str]) -> None:
    suite.write(conftest=SERVICE_CONFTEST, test_use=USE_TESTS)

    result = suite.run(*args, "-p", "no:randomly", env={"PREWARM_TEST_FAIL": "1"})

    assert result.ret in (1, 2)  # failed; xdist reports -x as interrupted
    done = check_once_after_every_test(suite)
    assert_nothing_left(suite, {done["pid"]})


def test_a_later_run_on_a_persistent_lock_dir_builds_and_tears_down_its_own(
    suite: Suite,
) -> None:
    suite.write(conftest=SERVICE_CONFTEST, test_use=USE_TESTS)

    first = suite.run("-n", "2", run="a")
    second = suite.run("-n", "2", run="b")

    first.assert_outcomes(passed=6)
    second.assert_outcomes(passed=6)
    assert len(suite.attempts()) == 2  # the first run's server was stopped: built again
    done = teardowns(suite)
    assert [d["pid"] for d in done] == [
        suite.records("ran", "a")[0]["server"],
        suite.records("ran", "b")[0]["server"],
    ]
    assert_nothing_left(suite, {d["pid"] for d in done})


DIR_ONLY = """
    import pytest_prewarm
    import prewarm_probe as probe


    @pytest_prewarm.template("data")
    def build(path):
        probe.count_attempt(path)
        (path / "rows.txt").write_text("1\\n2\\n")
"""


def test_a_template_without_teardown_is_kept_and_reused_by_the_next_run(suite: Suite) -> None:
    suite.write(
        conftest=DIR_ONLY,
        test_data="""
            import pytest

            @pytest.mark.prewarm("data")
            def test_reads(prewarmed):
                assert (prewarmed["data"].path / "rows.txt").read_text() == "1\\n2\\n"
        """,
    )

    suite.run().assert_outcomes(passed=1)
    suite.run().assert_outcomes(passed=1)

    assert len(suite.attempts()) == 1
    assert list((suite.lock_dir / "templates").iterdir())
    assert not (suite.lock_dir / "services").exists()  # nothing of this feature on disk


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_teardown_that_fails_or_hangs_is_reported_and_fails_the_run(
    suite: Suite, mode: str, tmp_path: Path
) -> None:
    suite.write(conftest=SERVICE_CONFTEST, test_use=USE_TESTS)
    report = tmp_path / "report.json"

    started = time.monotonic()
    result = suite.run(
        "-n",
        "2",
        "--prewarm-teardown-timeout=1",
        f"--prewarm-json={report}",
        env={"PREWARM_TEST_TEARDOWN": mode},
    )
    took = time.monotonic() - started

    result.assert_outcomes(passed=6)  # the tests' results stay as they were
    assert result.ret == 1
    word = "FAILED" if mode == "raise" else "HUNG"
    result.stdout.fnmatch_lines([f"server  teardown by controller: {word} after *"])
    if mode == "raise":
        result.stdout.fnmatch_lines(["*RuntimeError: the server refused to stop*"])
    else:
        result.stdout.fnmatch_lines(["*still running after 1 s (see --prewarm-teardown-timeout)*"])
        assert took < 60
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1
    [entry] = data["teardowns"]
    assert entry["template"] == "server"
    assert entry["outcome"] == ("failed" if mode == "raise" else "timeout")
    assert data["settings"]["teardown_timeout"] == 1.0
    assert len(teardowns(suite)) == 1
    assert_nothing_left(suite, {teardowns(suite)[0]["pid"]})


def test_a_lambda_teardown_is_refused_with_a_clear_error(suite: Suite) -> None:
    suite.write(
        test_lambda="""
            def test_it(prewarmed_template):
                prewarmed_template("t", lambda path: 1, teardown=lambda path, value: None)
        """
    )

    result = suite.run()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*teardown test_lambda.test_it.<locals>.<lambda> for template 't' is a lambda*"]
    )
    assert not (suite.lock_dir / "services").exists()


def test_ctrl_c_tears_down_once_after_the_running_test(suite: Suite) -> None:
    suite.write(
        conftest=SERVICE_CONFTEST,
        test_slow="""
            import time

            import pytest

            import prewarm_probe as probe


            @pytest.mark.prewarm("server")
            def test_waits_for_ctrl_c(prewarmed):
                probe.record("up", server=prewarmed["server"].value["pid"])
                time.sleep(120)
        """,
    )
    proc = suite.spawn("-p", "no:xdist")
    wait_until(lambda: suite.records("up"), 60, what="the test to start")
    server = suite.records("up")[0]["server"]

    os.kill(proc.pid, signal.SIGINT)

    assert proc.wait() == 2, proc.output()
    assert "teardown by controller: done" in proc.output()
    assert [d["pid"] for d in teardowns(suite)] == [server]
    assert_nothing_left(suite, {server})


HANGING_TESTS = """
    import time

    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(4))
    @pytest.mark.prewarm("server")
    def test_hangs_with_the_server(prewarmed, i):
        probe.record("up", server=prewarmed["server"].value["pid"])
        time.sleep(120)
"""


@pytest.mark.parametrize("args", [["-n", "2"], ["-p", "no:xdist"]], ids=["n2", "no-xdist"])
def test_a_run_killed_as_a_process_group_is_torn_down_within_2_s(
    suite: Suite, args: list[str]
) -> None:
    suite.write(conftest=SERVICE_CONFTEST, test_hang=HANGING_TESTS)
    proc = suite.spawn(*args)
    expected = 2 if "-n" in args else 1
    wait_until(lambda: len(suite.records("up")) >= expected, 60, what="the tests to start")
    server = suite.records("up")[0]["server"]

    killed_at = time.time()
    os.killpg(proc.pid, signal.SIGKILL)

    proc.wait()
    wait_until(lambda: teardowns(suite), 30, what="the reaper's teardown")
    [done] = teardowns(suite)
    assert done["pid"] == server
    assert done["pgid"] != proc.pid  # run outside the killed group: by the reaper
    assert done["at"] - killed_at < 2.0
    assert_nothing_left(suite, {server})
    assert not list((suite.lock_dir / "services").glob("*/*.json"))
    log = next((suite.lock_dir / "services").glob("*.reaper.log")).read_text()
    assert "teardown of 'server': ok" in log


RETURN_LINE = '        return services.start(argv, path, name="http", port=port)'
STARTED_LINES = [
    '        value = services.start(argv, path, name="http", port=port)',
    '        probe.record("started", server=value["pid"])',
]
CRASHING_CONFTEST = SERVICE_CONFTEST.replace(
    RETURN_LINE,
    "\n".join(
        [
            *STARTED_LINES,
            '        if os.environ.get("PREWARM_TEST_CRASH") == "build" and attempt == 1:',
            "            os._exit(9)  # the worker dies with its server up, before returning",
            "        return value",
        ]
    ),
).replace("        probe.count_attempt(path)", "        attempt = probe.count_attempt(path)")

CRASH_IN_TEST = """
    import os
    import time

    import pytest

    import prewarm_probe as probe


    @pytest.mark.parametrize("i", range(6))
    @pytest.mark.prewarm("server")
    def test_uses_the_server(prewarmed, i):
        value = prewarmed["server"].value
        probe.record("ran", end=time.time(), server=value["pid"])
        if os.environ.get("PREWARM_TEST_CRASH") == "test" and i == 0:
            os._exit(9)
"""


def test_a_builder_that_dies_mid_build_has_its_server_stopped_and_the_rebuild_torn_down(
    suite: Suite,
) -> None:
    suite.write(conftest=CRASHING_CONFTEST, test_use=CRASH_IN_TEST)

    result = suite.run("-n", "2", "--max-worker-restart=2", env={"PREWARM_TEST_CRASH": "build"})

    assert len(suite.attempts()) == 2
    started = {r["server"] for r in suite.records("started")}
    [rebuilt] = {r["server"] for r in suite.records("ran")}
    assert len(started) == 2
    assert rebuilt in started
    # The rebuild's server got the user's teardown; the dead build's, a stop by its record.
    assert [d["pid"] for d in teardowns(suite)] == [rebuilt]
    result.stdout.fnmatch_lines(
        ["*server  teardown by controller: stopped what its unfinished build started in *"]
    )
    result.stdout.fnmatch_lines(["*server  teardown by controller: done in *"])
    assert_nothing_left(suite, started)


def test_a_worker_that_dies_after_building_leaves_one_teardown_to_the_controller(
    suite: Suite,
) -> None:
    suite.write(conftest=CRASHING_CONFTEST, test_use=CRASH_IN_TEST)

    result = suite.run(
        "-n", "2", "--max-worker-restart=2", "-p", "no:randomly", env={"PREWARM_TEST_CRASH": "test"}
    )

    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*"])
    assert len(suite.attempts()) == 1
    [server] = {r["server"] for r in suite.records("started")}
    assert [d["pid"] for d in teardowns(suite)] == [server]
    assert_nothing_left(suite, {server})


def test_a_build_that_fails_after_starting_a_server_has_it_stopped(suite: Suite) -> None:
    suite.write(
        conftest=SERVICE_CONFTEST.replace(
            RETURN_LINE,
            "\n".join([*STARTED_LINES, '        raise RuntimeError("migrations failed")']),
        ),
        test_use=USE_TESTS,
    )

    result = suite.run("-p", "no:xdist")

    result.assert_outcomes(errors=6)
    [started] = suite.records("started")
    assert teardowns(suite) == []  # no value: the user's teardown cannot be called
    result.stdout.fnmatch_lines(["*stopped what its unfinished build started*"])
    assert_nothing_left(suite, {started["server"]})


SHARED_TESTS = """
    import time

    import pytest

    import prewarm_probe as probe


    @pytest.mark.prewarm("server")
    def test_shares_the_server(prewarmed):
        value = prewarmed["server"].value
        probe.record("ran", end=time.time(), server=value["pid"], origin=prewarmed["server"].origin)
        release = probe.HERE / f"release-{probe.RUN}"
        probe.wait_until(release.exists, what=str(release))
"""


@pytest.mark.parametrize(
    ("first", "how"),
    [("a", "end"), ("b", "end"), ("a", "kill")],
    ids=["builder-ends-first", "joiner-ends-first", "builder-killed-first"],
)
def test_concurrent_runs_sharing_a_service_leave_it_to_the_last_to_end(
    suite: Suite, first: str, how: str
) -> None:
    suite.write(conftest=SERVICE_CONFTEST, test_shared=SHARED_TESTS)
    runs = {"a": suite.spawn("-p", "no:xdist", run="a")}
    wait_until(lambda: suite.records("ran", "a"), 60, what="run a to build and use the server")
    runs["b"] = suite.spawn("-n", "2", run="b")
    wait_until(lambda: suite.records("ran", "b"), 60, what="run b to use the server")
    [a], [b] = suite.records("ran", "a"), suite.records("ran", "b")
    assert (a["origin"], b["origin"]) == ("built", "reused")
    server = a["server"]
    assert b["server"] == server
    last = "b" if first == "a" else "a"

    if how == "kill":
        os.killpg(runs[first].pid, signal.SIGKILL)
    else:
        (suite.path / f"release-{first}").touch()
    runs[first].wait()
    # The first run's end (or its watcher, once it was killed) leaves the server up.
    wait_until(lambda: not reapers_left_for(suite, runs[first].pid), 10, what="its watcher")
    assert teardowns(suite) == []
    assert running(server)

    (suite.path / f"release-{last}").touch()
    assert runs[last].wait() == 0, runs[last].output()

    [done] = teardowns(suite)
    assert done["pid"] == server
    assert done["by"] == runs[last].pid  # the last run's controller
    assert_nothing_left(suite, {server})


def reapers_left_for(suite: Suite, controller: int) -> list[psutil.Process]:
    """Watchers of the run whose controller is ``controller``."""
    return [
        p
        for p in reapers_left(suite.lock_dir)
        if f'"pid": {controller},' in " ".join(p.info["cmdline"])
    ]
