"""Eager prewarming: marked templates are built early, split across workers, in parallel.

Every inner builder appends one JSON line per build to builds.jsonl: the template, the
worker, the thread, and its start and end on the system-wide monotonic clock. The tests
assert on that log (who built what, in which order, overlapping or not), never on timing.
"""

from __future__ import annotations

import itertools
import json
import re
import textwrap
from typing import Any

import pytest

LOGGING = """
    import json
    import os
    import threading
    import time
    from pathlib import Path

    HERE = Path(__file__).resolve().parent
    LOG = HERE / "builds.jsonl"


    def worker():
        return os.environ.get("PYTEST_XDIST_WORKER", "main")


    def wait_until(predicate, what, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.005)


    def log_build(name, start, **extra):
        line = {
            "name": name,
            "worker": worker(),
            "thread": threading.current_thread().name,
            "start": start,
            "end": time.monotonic(),
            **extra,
        }
        # One short O_APPEND write per line: concurrent builders never interleave.
        fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, (json.dumps(line) + "\\n").encode())
        finally:
            os.close(fd)


    STARTED = HERE / "started"


    def mark_started(name):
        STARTED.mkdir(exist_ok=True)
        (STARTED / name).touch()


    def wait_all_started(count, what):
        wait_until(lambda: STARTED.is_dir() and len(list(STARTED.iterdir())) == count, what)


    def logged():
        if not LOG.exists():
            return []
        return [json.loads(line) for line in LOG.read_text().splitlines()]
"""


@pytest.fixture(autouse=True)
def _no_leaky_env(no_leaky_env: None) -> None:
    """Every test here runs inner pytest sessions (see conftest.LEAKY_ENV)."""


def write(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makepyfile(build_log=textwrap.dedent(LOGGING))
    pytester.makepyfile(**{name: textwrap.dedent(src) for name, src in files.items()})


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=100)


def logged(pytester: pytest.Pytester) -> list[dict[str, Any]]:
    log = pytester.path / "builds.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


# -- four templates, four workers -------------------------------------------------------

FOUR_CONFTEST = """
    import time

    import pytest
    import pytest_prewarm
    from build_log import log_build, mark_started, wait_all_started

    NAMES = ["t0", "t1", "t2", "t3"]


    def register(name):
        @pytest_prewarm.template(name)
        def build(path):
            start = time.monotonic()
            mark_started(name)
            # Finish only once all four builds have started. Built one after another
            # (a worker blocking on its first test's first template), they never would,
            # and this times out, failing the build and the run.
            wait_all_started(len(NAMES), "all four builds")
            (path / "ready").write_text(name)
            log_build(name, start)
            return name


    for name in NAMES:
        register(name)


    @pytest.hookimpl(tryfirst=True)  # before the plugin's: it fetches the marked templates
    def pytest_runtest_setup(item):
        # A test asks only once every worker's eager walk has started its first template.
        # Else a worker whose collection ends late (a loaded machine) finds its template
        # taken by another worker's test setup, and the test would measure the scheduler.
        # Built one after another, the four never all start, and this times out.
        wait_all_started(len(NAMES), "all four eager builds to start")
"""

FOUR_TESTS = """
    import pytest

    pytestmark = pytest.mark.prewarm("t0", "t1", "t2", "t3")


    @pytest.mark.parametrize("n", range(8))
    def test_needs_all_four(prewarmed, n):
        assert sorted(prewarmed) == ["t0", "t1", "t2", "t3"]
        for name, template in prewarmed.items():
            assert (template.path / "ready").read_text() == name == template.value
"""


def test_four_workers_build_four_templates_at_the_same_time_once_each(
    pytester: pytest.Pytester,
) -> None:
    write(pytester, conftest=FOUR_CONFTEST, test_four=FOUR_TESTS)
    result = run(pytester, "-n", "4")
    result.assert_outcomes(passed=8)
    builds = logged(pytester)
    assert sorted(b["name"] for b in builds) == ["t0", "t1", "t2", "t3"]
    # Each in its own worker, and all four spans overlap.
    assert sorted(b["worker"] for b in builds) == ["gw0", "gw1", "gw2", "gw3"]
    assert max(b["start"] for b in builds) < min(b["end"] for b in builds)
    result.stdout.fnmatch_lines(["*= prewarm summary =*"])
    for name in ("t0", "t1", "t2", "t3"):
        result.stdout.fnmatch_lines([f"{name}  built by gw? in *"])


# -- more templates than workers: a worker builds its share side by side -------------------

SHARE_CONFTEST = """
    import os
    import time

    import pytest
    import pytest_prewarm
    from build_log import log_build, mark_started, wait_all_started

    NAMES = [f"t{n}" for n in range(8)]
    TOGETHER = os.environ["BUILD_TOGETHER"] == "1"


    def register(name):
        @pytest_prewarm.template(name)
        def build(path):
            start = time.monotonic()
            mark_started(name)
            if TOGETHER:
                # Only eight builds running at once get past this; one at a time per
                # worker, they never would, and the builds time out.
                wait_all_started(len(NAMES), "all eight")
            log_build(name, start)
            return name


    for name in NAMES:
        register(name)


    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(item):
        if TOGETHER:  # as in the four-workers test: no test takes a template from a walk
            wait_all_started(len(NAMES), "all eight eager builds to start")
"""

SHARE_TESTS = """
    import pytest

    pytestmark = pytest.mark.prewarm(*[f"t{n}" for n in range(8)])


    @pytest.mark.parametrize("n", range(4))
    def test_needs_all_eight(prewarmed, n):
        assert sorted(t.value for t in prewarmed.values()) == sorted(prewarmed)
"""


def test_two_workers_build_eight_templates_four_at_a_time_each_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(pytester, conftest=SHARE_CONFTEST, test_share=SHARE_TESTS)
    monkeypatch.setenv("BUILD_TOGETHER", "1")
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=4)
    builds = logged(pytester)
    assert sorted(b["name"] for b in builds) == [f"t{n}" for n in range(8)]
    assert max(b["start"] for b in builds) < min(b["end"] for b in builds)  # all at once
    for worker, first in (("gw0", 0), ("gw1", 4)):  # each its own share of ceil(8 / 2)
        mine = [b for b in builds if b["worker"] == worker]
        assert sorted(b["name"] for b in mine) == [f"t{n}" for n in range(first, first + 4)]
        assert len({b["thread"] for b in mine}) == 4
        assert all(b["thread"].startswith("prewarm-eager") for b in mine)


def test_one_eager_thread_builds_a_workers_share_one_after_another(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(pytester, conftest=SHARE_CONFTEST, test_share=SHARE_TESTS)
    monkeypatch.setenv("BUILD_TOGETHER", "0")
    result = run(pytester, "-n", "2", "--prewarm-eager-threads", "1")
    result.assert_outcomes(passed=4)
    builds = logged(pytester)
    assert sorted(b["name"] for b in builds) == [f"t{n}" for n in range(8)]
    eager = [b for b in builds if b["thread"] != "MainThread"]
    assert {b["thread"] for b in eager} == {"prewarm-eager"}  # one thread per worker
    for worker in ("gw0", "gw1"):
        spans = sorted((b["start"], b["end"]) for b in eager if b["worker"] == worker)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


# -- only what the selected tests need --------------------------------------------------

SELECTION_CONFTEST = """
    import time

    import pytest_prewarm
    from build_log import log_build


    @pytest_prewarm.template("kept")
    def build_kept(path):
        log_build("kept", time.monotonic())


    @pytest_prewarm.template("dropped")
    def build_dropped(path):
        log_build("dropped", time.monotonic())
"""

SELECTION_TESTS = """
    import pytest


    @pytest.mark.prewarm("kept")
    def test_kept(prewarmed):
        assert list(prewarmed) == ["kept"]


    @pytest.mark.prewarm("kept")
    def test_kept_too(prewarmed):
        pass


    @pytest.mark.slow
    @pytest.mark.prewarm("dropped")
    def test_dropped():
        pass


    @pytest.mark.slow
    @pytest.mark.prewarm("kept", "dropped")
    def test_dropped_too():
        pass


    def test_plain():
        pass
"""


@pytest.mark.parametrize(
    "args",
    [
        ("-n", "2", "-k", "not dropped"),
        ("-p", "no:xdist", "-m", "not slow"),
        (
            "-p",
            "no:xdist",
            "--deselect",
            "test_selection.py::test_dropped",
            "--deselect",
            "test_selection.py::test_dropped_too",
        ),
    ],
    ids=["k", "m", "deselect"],
)
def test_a_template_whose_only_users_are_deselected_is_not_built(
    pytester: pytest.Pytester, args: tuple[str, ...]
) -> None:
    write(pytester, conftest=SELECTION_CONFTEST, test_selection=SELECTION_TESTS)
    pytester.makeini("[pytest]\nmarkers =\n    slow: a slow test\n")
    result = run(pytester, *args)
    # xdist's controller does not count its workers' deselections.
    result.assert_outcomes(passed=3, deselected=0 if "-n" in args else 2)
    # The run is over, background builds included (they are joined at session finish).
    assert [b["name"] for b in logged(pytester)] == ["kept"]


# -- eager off --------------------------------------------------------------------------

ORDER_CONFTEST = """
    import time

    import pytest_prewarm
    from build_log import HERE, log_build


    def register(name):
        @pytest_prewarm.template(name)
        def build(path):
            log_build(name, time.monotonic(), after_first_test=(HERE / "first-done").exists())


    register("a")
    register("b")
"""

ORDER_TESTS = """
    import os

    import pytest
    from build_log import HERE, logged, wait_until


    def test_0_needs_nothing():
        if os.environ["EXPECT_EAGER"] == "1":
            # Built in the background while this test runs, before anyone needs them.
            wait_until(lambda: len(logged()) == 2, "the background builds")


    @pytest.mark.prewarm("a")
    def test_1_needs_a(prewarmed):
        (HERE / "first-done").touch()


    @pytest.mark.prewarm("b")
    def test_2_needs_b(prewarmed):
        assert list(prewarmed) == ["b"]
"""


@pytest.mark.parametrize(
    ("args", "ini", "eager"),
    [
        pytest.param((), None, True, id="default-on"),
        pytest.param(("--no-prewarm-eager",), None, False, id="option-off"),
        pytest.param((), "false", False, id="ini-off"),
        pytest.param(("--prewarm-eager",), "false", True, id="option-overrides-ini"),
    ],
)
def test_without_eager_each_template_is_built_when_a_test_first_needs_it(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    ini: str | None,
    eager: bool,
) -> None:
    write(pytester, conftest=ORDER_CONFTEST, test_order=ORDER_TESTS)
    if ini is not None:
        pytester.makeini(f"[pytest]\nprewarm_eager = {ini}\n")
    monkeypatch.setenv("EXPECT_EAGER", "1" if eager else "0")
    result = run(pytester, "-p", "no:xdist", *args)
    result.assert_outcomes(passed=3)
    builds = {b["name"]: b for b in logged(pytester)}
    assert sorted(builds) == ["a", "b"]  # once each either way
    if eager:
        assert all(b["thread"].startswith("prewarm-eager") for b in builds.values())
        assert not builds["b"]["after_first_test"]
    else:
        # On the main thread, in the setup of the test that needs it: b only after test 1.
        assert {b["thread"] for b in builds.values()} == {"MainThread"}
        assert not builds["a"]["after_first_test"]
        assert builds["b"]["after_first_test"]


# -- a background build that fails -------------------------------------------------------

FAILING_CONFTEST = """
    import time

    import pytest_prewarm
    from build_log import log_build


    @pytest_prewarm.template("broken")
    def build_broken(path):
        log_build("broken", time.monotonic())
        raise RuntimeError("database image is corrupt")


    @pytest_prewarm.template("fine")
    def build_fine(path):
        log_build("fine", time.monotonic())
"""

FAILING_TESTS = """
    import pytest
    from build_log import logged, wait_until


    def test_0_waits_for_the_background_attempt():
        # No test has asked for "broken" yet: only an eager build can make this attempt.
        wait_until(lambda: any(b["name"] == "broken" for b in logged()), "the attempt")


    @pytest.mark.prewarm("broken")
    def test_1_needs_broken():
        pass


    @pytest.mark.prewarm("fine", "broken")
    def test_2_needs_broken_too():
        pass


    @pytest.mark.prewarm("fine")
    def test_3_needs_only_fine(prewarmed):
        assert list(prewarmed) == ["fine"]
"""


def test_a_failed_background_build_errors_every_test_that_needs_it(
    pytester: pytest.Pytester,
) -> None:
    write(
        pytester,
        conftest=FAILING_CONFTEST,
        test_first=FAILING_TESTS,
        test_second=FAILING_TESTS,
    )
    # loadfile: each worker gets one file, so each starts with the waiting test.
    result = run(pytester, "-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=4, errors=4)
    attempts = [b for b in logged(pytester) if b["name"] == "broken"]
    assert len(attempts) == 1
    assert attempts[0]["thread"].startswith("prewarm-eager")
    builder = attempts[0]["worker"]
    error = re.compile(
        r"^E +pytest_prewarm\.exceptions\.PrewarmBuildError: building template 'broken' "
        rf"failed in {builder} \(pid \d+\): RuntimeError: database image is corrupt$"
    )
    assert sum(bool(error.match(line)) for line in result.outlines) == 4
    in_setup = re.compile(r"^_+ ERROR at setup of (test_\w+) _+$")
    assert sorted(m[1] for line in result.outlines if (m := in_setup.match(line))) == [
        "test_1_needs_broken",
        "test_1_needs_broken",
        "test_2_needs_broken_too",
        "test_2_needs_broken_too",
    ]
    result.stdout.fnmatch_lines(
        [f"broken  failed in {builder} after *.** s: RuntimeError: database image is corrupt*"]
    )
