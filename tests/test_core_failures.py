"""Failed builds, non-JSON results and timeouts: one attempt per run, and errors that say why."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pytest_prewarm.names import file_stem

FAILING_CONFTEST = """
    import os

    import pytest

    import prewarm_probe as probe

    EXPECT = int(os.environ.get("PREWARM_TEST_EXPECT", "1"))


    def build(path):
        probe.count_attempt(path)
        (path / "half-written.txt").write_text("partial")
        probe.wait_for_requests(EXPECT)
        RESULT = os.environ["PREWARM_TEST_RESULT"]
        if RESULT == "raise":
            raise RuntimeError("schema migration 0042 failed: no such table: users")
        return {1, 2, 3}  # a set: not JSON


    @pytest.fixture
    def ask(prewarmed_template):
        def ask():
            probe.announce_request()
            return prewarmed_template("db", build)
        return ask
"""

FAILING_TESTS = """
    import os

    import pytest

    import prewarm_probe as probe
    from pytest_prewarm import PrewarmBuildError

    COUNT = int(os.environ.get("PREWARM_TEST_COUNT", "2"))


    @pytest.mark.parametrize("i", range(COUNT))
    def test_every_request_gets_the_build_error(ask, i):
        # Asked directly each time (no caching fixture), so each test proves the store's
        # behaviour, not pytest's caching of a failed fixture.
        with pytest.raises(PrewarmBuildError) as info:
            ask()
        error = info.value
        probe.record(
            "error",
            text=str(error),
            template=error.template,
            exc_type=error.exc_type,
            exc_message=error.exc_message,
            traceback=error.traceback_text,
            built_in=error.worker,
            built_pid=error.pid,
        )
"""

MESSAGE = "schema migration 0042 failed: no such table: users"


def staging_leftovers(lock_dir: Path) -> list[Path]:
    """Builds that no meta.json publishes: failed attempts, or an emptied template dir."""
    left = []
    for entry in (lock_dir / "templates").iterdir():
        meta = entry / "meta.json"
        published = json.loads(meta.read_text())["build"] if meta.exists() else None
        left += [entry] if published is None else []
        left += [p for p in entry.iterdir() if p.name not in ("meta.json", published)]
    return left


def test_failing_build_is_attempted_once_and_every_worker_gets_its_error(suite):
    suite.write(conftest=FAILING_CONFTEST, test_db=FAILING_TESTS)

    first = suite.run(
        "-n",
        "4",
        run="first",
        env={
            "PREWARM_TEST_RESULT": "raise",
            "PREWARM_TEST_EXPECT": "4",
            "PREWARM_TEST_COUNT": "8",
        },
    )

    first.assert_outcomes(passed=8)
    (attempt,) = suite.attempts()
    errors = suite.records("error", run="first")
    assert len(errors) == 8
    assert {e["worker"] for e in errors} == {"gw0", "gw1", "gw2", "gw3"}
    for error in errors:
        assert error["built_in"] == attempt["worker"]
        assert error["built_pid"] == attempt["pid"]
        assert error["template"] == "db"
        assert error["exc_type"] == "RuntimeError"
        assert error["exc_message"] == MESSAGE
        assert MESSAGE in error["text"]
        assert attempt["worker"] in error["text"]
        assert "'db'" in error["text"]
        assert "raise RuntimeError(" in error["traceback"]
    assert staging_leftovers(suite.lock_dir) == []
    assert list((suite.lock_dir / "templates").iterdir()) == []

    second = suite.run("-p", "no:xdist", run="second", env={"PREWARM_TEST_RESULT": "raise"})

    second.assert_outcomes(passed=2)
    assert [a["run"] for a in suite.attempts()] == ["first", "second"]
    assert {e["built_in"] for e in suite.records("error", run="second")} == {"main"}
    assert staging_leftovers(suite.lock_dir) == []


def test_non_json_build_result_is_a_clear_error_and_the_runs_one_attempt(suite):
    suite.write(conftest=FAILING_CONFTEST, test_db=FAILING_TESTS)

    result = suite.run(
        "-n",
        "2",
        env={"PREWARM_TEST_RESULT": "set", "PREWARM_TEST_EXPECT": "2", "PREWARM_TEST_COUNT": "4"},
    )

    result.assert_outcomes(passed=4)
    (attempt,) = suite.attempts()
    errors = suite.records("error")
    assert len(errors) == 4
    assert {e["worker"] for e in errors} == {"gw0", "gw1"}
    for error in errors:
        assert error["built_in"] == attempt["worker"]
        message = error["exc_message"]
        assert "'db'" in message
        assert "set" in message
        assert "JSON" in message
        assert message in error["text"]
    assert staging_leftovers(suite.lock_dir) == []


HOLDER = """
    import os
    import sys
    import time
    from pathlib import Path

    from pytest_prewarm.lockdir import prepare
    from pytest_prewarm.request import Request, TemplateStore

    lock_dir, flags = Path(sys.argv[1]), Path(sys.argv[2])
    prepare(lock_dir, "the holder's argv")  # tagged as a run's own would be


    def build(path):
        (flags / "building").touch()
        deadline = time.monotonic() + 90
        while not (flags / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never released the holder")
            time.sleep(0.01)
        return "held"


    store = TemplateStore(lock_dir, run_id="holder-run", worker="holder-gw9")
    template = store.get(Request("db", build, None, 60.0))
    print("holder done", template.value, flush=True)
"""

TIMEOUT_TESTS = """
    import json
    import os

    import pytest

    import prewarm_probe as probe
    from pytest_prewarm import PrewarmTimeout


    def build(path):
        probe.count_attempt(path)


    def check(error, label):
        probe.record(
            label,
            text=str(error),
            template=error.template,
            lock_path=error.lock_path,
            waited=error.waited,
        )


    def test_run_wide_timeout(prewarmed_template):
        with pytest.raises(PrewarmTimeout) as info:
            prewarmed_template("db", build)
        check(info.value, "option")


    def test_per_call_timeout(prewarmed_template):
        with pytest.raises(PrewarmTimeout) as info:
            prewarmed_template("db", build, timeout=0.5)
        check(info.value, "per-call")
"""


def test_waiting_on_a_live_holder_times_out_with_an_error_that_names_it(suite, processes, wait_for):
    flags = suite.path / "flags"
    flags.mkdir()
    holder = processes.python(HOLDER, str(suite.lock_dir), str(flags), cwd=suite.path)
    wait_for(
        lambda: (flags / "building").exists() or holder.popen.poll() is not None,
        what="the holder to start building",
    )
    assert holder.popen.poll() is None, holder.output()
    suite.write(test_timeout=TIMEOUT_TESTS)

    result = suite.run("-p", "no:xdist", "--prewarm-timeout", "1")

    (flags / "release").touch()
    assert holder.wait(timeout=60) == 0, holder.output()
    assert "holder done held" in holder.output()
    result.assert_outcomes(passed=2)
    assert suite.attempts() == []  # the waiter never built
    lock_path = suite.lock_dir / "locks" / f"{file_stem('db')}.{_null_key_digest()}.lock"
    for label, at_least in (("option", 1.0), ("per-call", 0.5)):
        (error,) = suite.records(label)
        text = error["text"]
        assert error["template"] == "db"
        assert error["lock_path"] == str(lock_path)
        assert at_least <= error["waited"] < at_least + 10
        assert "'db'" in text
        assert str(lock_path) in text
        assert "holder-gw9" in text
        assert f"pid {holder.pid}" in text
        assert "alive" in text
        assert re.search(rf"holder-gw9, pid {holder.pid} on this host, alive\b.*, \d+ s\b", text)
        assert "--prewarm-timeout" in text  # the hint: what to try
    # The holder finished normally and published; nothing of the waiters' got in the way.
    meta = json.loads((suite.lock_dir / "templates" / lock_path.stem / "meta.json").read_text())
    assert meta["value"] == "held"
    assert meta["built_by"] == "holder-gw9"


def _null_key_digest() -> str:
    from pytest_prewarm.names import canonical_key, key_digest

    return key_digest(canonical_key(None, name="db"))


BAD_NAMES_TESTS = r"""
    import pytest

    import prewarm_probe as probe
    from pytest_prewarm import PrewarmUsageError


    def build(path):
        probe.count_attempt(path)


    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("", "empty"),
            ("   ", "empty"),
            ("a\x00b", "NUL"),
            ("x" * 201, "201 characters long; the limit is 200"),
            (42, "must be a str, got int 42"),
            (None, "must be a str, got NoneType"),
            (b"db", "must be a str, got bytes"),
        ],
    )
    def test_bad_name(prewarmed_template, name, expected):
        with pytest.raises(PrewarmUsageError) as info:
            prewarmed_template(name, build)
        probe.record("error", text=str(info.value), expected=expected)
"""


def test_unusable_template_names_are_rejected_with_clear_errors(suite):
    suite.write(test_names=BAD_NAMES_TESTS)

    result = suite.run("-p", "no:xdist")

    result.assert_outcomes(passed=7)
    errors = suite.records("error")
    assert len(errors) == 7
    for error in errors:
        assert error["expected"] in error["text"]
        assert "template name" in error["text"]
    assert suite.attempts() == []
    assert template_ids_of(suite.lock_dir) == []


def template_ids_of(lock_dir: Path) -> list[str]:
    return sorted(p.name for p in (lock_dir / "locks").glob("*.lock"))


def escaping_names(outer: Path) -> list[str]:
    # An absolute name pointing next to the lock dir: if it were joined as a path, the
    # file would land where the final listing of ``outer`` sees it.
    return ["../x", "../../../escape", "a/b", "a_b", "..", ".", "~/x", str(outer / "abs")]


PATH_NAMES_TESTS = """
    import json
    import os
    from pathlib import Path

    import pytest

    import prewarm_probe as probe

    NAMES = json.loads(os.environ["PREWARM_TEST_NAMES"])


    def build(path):
        probe.count_attempt(path)
        (path / "who").write_text(path.parents[1].name)
        return probe.worker()


    @pytest.mark.parametrize("name", NAMES)
    def test_path_like_name(prewarmed_template, name):
        template = prewarmed_template(name, build)
        assert template.name == name
        probe.record("seen", name=name, fspath=os.fspath(template))
"""


def test_path_like_names_map_to_distinct_safe_names_inside_the_lock_dir(suite):
    outer = suite.path / "outer"
    lock_dir = outer / "middle" / "lock-dir"
    suite.lock_dir = lock_dir
    names = escaping_names(outer)
    suite.write(test_paths=PATH_NAMES_TESTS)
    before = {p.name for p in suite.path.iterdir()}

    result = suite.run("-p", "no:xdist", env={"PREWARM_TEST_NAMES": json.dumps(names)})

    result.assert_outcomes(passed=len(names))
    seen = {r["name"]: Path(r["fspath"]) for r in suite.records("seen")}
    assert sorted(seen) == sorted(names)
    for path in seen.values():
        assert path.resolve().is_relative_to(lock_dir.resolve() / "templates")
    assert len(set(seen.values())) == len(names)  # "a/b" and "a_b" stay apart
    assert len(suite.attempts()) == len(names)
    locks = template_ids_of(lock_dir)
    assert len(locks) == len(names)
    assert all(not lock.startswith(".") for lock in locks)
    # Nothing appeared next to the lock dir or above it (pytester's HOME is suite.path).
    assert sorted(p.name for p in outer.iterdir()) == ["middle"]
    assert sorted(p.name for p in (outer / "middle").iterdir()) == ["lock-dir"]
    new = {p.name for p in suite.path.iterdir()} - before
    pytester_own = {"stdout", "stderr"}
    assert {n for n in new - pytester_own if not n.startswith("runpytest-")} == {
        "outer",
        "records",
        "counter.jsonl",
    }
