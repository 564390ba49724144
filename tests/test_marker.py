"""The ``@pytest.mark.prewarm(*names)`` marker: where it goes, what it gives, how it fails.

Inner suites run in subprocesses: their conftests register builders in a process-wide
registry, which must not leak into this process.
"""

from __future__ import annotations

import json
import textwrap

import pytest

# Two registered templates; each build appends one line to builds.jsonl.
CONFTEST = """
    import json
    import os
    from pathlib import Path

    import pytest
    import pytest_prewarm

    LOG = Path(__file__).resolve().parent / "builds.jsonl"


    def log_build(name):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"name": name, "worker": worker}) + "\\n")


    def built():
        if not LOG.exists():
            return []
        return [json.loads(line)["name"] for line in LOG.read_text().splitlines()]


    @pytest_prewarm.template("db")
    def build_db(path):
        log_build("db")
        (path / "schema.sql").write_text("create table t (x);")
        return {"dsn": "sqlite:///t.db"}


    @pytest_prewarm.template("cache")
    def build_cache(path):
        log_build("cache")
        (path / "cache.txt").write_text("warm")
        return 42


    @pytest.fixture(autouse=True)
    def marked_templates_are_ready(request):
        # Runs before any fixture of the test that asks for nothing prewarm-related.
        needed = {n for m in request.node.iter_markers("prewarm") for n in m.args}
        missing = needed - set(built())
        assert not missing, f"not built before the test's fixtures: {sorted(missing)}"
"""


@pytest.fixture(autouse=True)
def _no_leaky_env(no_leaky_env: None) -> None:
    """Every test here runs inner pytest sessions (see conftest.LEAKY_ENV)."""


def write(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makepyfile(conftest=textwrap.dedent(CONFTEST))
    pytester.makepyfile(**{name: textwrap.dedent(src) for name, src in files.items()})


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=100)


def builds(pytester: pytest.Pytester) -> list[str]:
    log = pytester.path / "builds.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["name"] for line in log.read_text().splitlines()]


LEVELS = """
    import pytest

    pytestmark = pytest.mark.prewarm("db")


    def test_module_level(prewarmed):
        assert list(prewarmed) == ["db"]
        assert (prewarmed["db"].path / "schema.sql").is_file()


    @pytest.mark.prewarm("cache")
    class TestClassLevel:
        def test_class_and_module(self, prewarmed):
            assert sorted(prewarmed) == ["cache", "db"]
            assert (prewarmed["cache"].path / "cache.txt").read_text() == "warm"

        @pytest.mark.prewarm("db", "cache")
        def test_named_again_on_the_method(self, prewarmed):
            assert sorted(prewarmed) == ["cache", "db"]
"""

CLASS_ONLY = """
    import pytest


    @pytest.mark.prewarm("cache")
    class TestOnlyTheClass:
        def test_one(self, prewarmed):
            assert list(prewarmed) == ["cache"]

        def test_two(self, prewarmed):
            assert prewarmed["cache"].value == 42


    def test_unmarked_gets_nothing(prewarmed):
        assert prewarmed == {}
"""


@pytest.mark.parametrize("xdist", [("-n", "2"), ("-p", "no:xdist")], ids=["n2", "no-xdist"])
def test_the_marker_works_on_classes_and_through_module_pytestmark(
    pytester: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    write(pytester, test_levels=LEVELS, test_class_only=CLASS_ONLY)
    result = run(pytester, "--strict-markers", *xdist)
    result.assert_outcomes(passed=6)
    assert sorted(builds(pytester)) == ["cache", "db"]


def test_the_prewarmed_fixture_maps_each_marked_name_to_its_template(
    pytester: pytest.Pytester,
) -> None:
    write(
        pytester,
        test_fixture="""
            import os

            import pytest
            import pytest_prewarm

            pytestmark = pytest.mark.prewarm("db")


            @pytest.mark.prewarm("cache")
            def test_closest_marker_first(prewarmed):
                assert list(prewarmed) == ["cache", "db"]
                db = prewarmed["db"]
                assert isinstance(db, pytest_prewarm.Template)
                assert db.name == "db"
                assert db.value == {"dsn": "sqlite:///t.db"}
                assert os.fspath(db) == str(db.path)
                assert (db / "schema.sql").read_text() == "create table t (x);"
                assert prewarmed["cache"].value == 42


            @pytest.mark.parametrize(
                "extra",
                [pytest.param(True, marks=pytest.mark.prewarm("cache")), False],
            )
            def test_marks_on_parameters(prewarmed, extra):
                assert sorted(prewarmed) == (["cache", "db"] if extra else ["db"])


            def test_a_fresh_dict_per_test(prewarmed):
                prewarmed.clear()


            def test_not_emptied_by_the_previous_test(prewarmed):
                assert list(prewarmed) == ["db"]
        """,
    )
    result = run(pytester, "-p", "no:xdist", "--no-prewarm-eager")
    result.assert_outcomes(passed=5)
    assert sorted(builds(pytester)) == ["cache", "db"]


def test_a_template_asked_for_by_marker_and_by_fixture_is_built_once(
    pytester: pytest.Pytester,
) -> None:
    write(
        pytester,
        test_both="""
            import pytest


            @pytest.mark.prewarm("db")
            def test_both_ways(prewarmed, prewarmed_template):
                by_fixture = prewarmed_template("db")
                assert by_fixture.path == prewarmed["db"].path
                assert by_fixture.value == prewarmed["db"].value


            def test_fixture_only_later(prewarmed_template):
                assert (prewarmed_template("db").path / "schema.sql").is_file()


            @pytest.mark.prewarm("db")
            def test_marker_only_later(prewarmed):
                assert prewarmed["db"].value == {"dsn": "sqlite:///t.db"}
        """,
    )
    # Eager off: the marker's build runs in the test's setup, right beside the fixture's.
    result = run(pytester, "-p", "no:xdist", "--no-prewarm-eager")
    result.assert_outcomes(passed=3)
    assert builds(pytester) == ["db"]


UNKNOWN = """
    import pytest


    def test_fine():
        pass


    @pytest.mark.prewarm("db", "missing")
    def test_uses_missing():
        pass
"""


@pytest.mark.parametrize(
    ("xdist", "exit_code"),
    [
        (("-p", "no:xdist"), pytest.ExitCode.INTERRUPTED),
        # xdist reports its workers' collection errors as errors of the run (exit 1).
        (("-n", "2"), pytest.ExitCode.TESTS_FAILED),
    ],
    ids=["no-xdist", "n2"],
)
def test_an_unknown_template_name_is_a_collection_error_listing_the_registered_names(
    pytester: pytest.Pytester, xdist: tuple[str, ...], exit_code: pytest.ExitCode
) -> None:
    write(pytester, test_unknown=UNKNOWN)
    result = run(pytester, *xdist)
    assert result.ret == exit_code
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_unknown.py*",
            "test_unknown.py::test_uses_missing: @pytest.mark.prewarm names template 'missing', "
            "which has no registered builder (registered: cache, db).*",
        ]
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors") == 1
    assert "passed" not in outcomes  # nothing ran, not even the valid test
    assert builds(pytester) == []


BAD_ARGUMENTS = {
    "test_no_names": """
        import pytest


        @pytest.mark.prewarm()
        def test_no_names():
            pass
    """,
    "test_not_a_string": """
        import pytest


        @pytest.mark.prewarm(1)
        def test_not_a_string():
            pass
    """,
    "test_keyword": """
        import pytest


        @pytest.mark.prewarm("db", foo=1)
        def test_keyword():
            pass
    """,
    "test_empty_on_class": """
        import pytest


        @pytest.mark.prewarm("")
        class TestEmpty:
            def test_empty(self):
                pass
    """,
}


def test_wrong_marker_arguments_are_collection_errors_naming_the_test(
    pytester: pytest.Pytester,
) -> None:
    write(pytester, **BAD_ARGUMENTS)
    result = run(pytester, "-p", "no:xdist")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert result.parseoutcomes().get("errors") == 4
    use = 'Use @pytest.mark.prewarm("name", ...) with registered template names.'
    for expected in [
        "test_no_names.py::test_no_names: invalid marker @pytest.mark.prewarm(): "
        "needs at least one template name*",
        "test_not_a_string.py::test_not_a_string: invalid marker @pytest.mark.prewarm(1): "
        "template name must be a str, got int 1*",
        "test_keyword.py::test_keyword: invalid marker @pytest.mark.prewarm('db', foo=1): "
        "*unexpected keyword argument 'foo'*",
        "test_empty_on_class.py::TestEmpty::test_empty: invalid marker "
        "@pytest.mark.prewarm(''): template name is empty*",
    ]:
        result.stdout.fnmatch_lines([expected])
    assert sum(use in line for line in result.outlines) == 4
    assert builds(pytester) == []


def test_pytest_markers_documents_the_marker_signature(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["@pytest.mark.prewarm(*names): the test needs these templates, registered with*"]
    )
