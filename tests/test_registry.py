"""Builders registered by name with ``@pytest_prewarm.template``."""

from __future__ import annotations

import inspect

import pytest

from pytest_prewarm import PrewarmUsageError
from pytest_prewarm.registry import Registry


def build_db(path):
    return "db"


def build_other_db(path):
    return "other"


def test_a_registered_builder_is_found_by_name():
    registry = Registry()

    registry.add("db", build_db, key="v1")

    entry = registry.get("db")
    assert entry is not None
    assert entry.build is build_db
    assert entry.key == "v1"
    assert registry.names() == ["db"]
    assert registry.get("other") is None


def test_registering_the_same_function_twice_is_fine():
    registry = Registry()

    registry.add("db", build_db)
    registry.add("db", build_db)

    assert registry.names() == ["db"]


def test_registering_a_name_twice_with_different_builders_names_both_places():
    registry = Registry()
    registry.add("db", build_db)

    with pytest.raises(PrewarmUsageError) as info:
        registry.add("db", build_other_db)

    text = str(info.value)
    first_line = inspect.getsourcelines(build_db)[1]
    second_line = inspect.getsourcelines(build_other_db)[1]
    assert "template 'db' is registered twice with different builders" in text
    assert f"{__file__}:{first_line} (build_db)" in text
    assert f"{__file__}:{second_line} (build_other_db)" in text
    assert registry.get("db").build is build_db  # the first registration stays


def test_a_builder_that_is_not_callable_is_refused():
    with pytest.raises(PrewarmUsageError, match="builder for template 'db' is not callable"):
        Registry().add("db", "not a function")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "a\x00b", 7])
def test_the_decorator_checks_the_name_when_it_is_applied(name):
    import pytest_prewarm

    with pytest.raises(PrewarmUsageError, match="template name"):
        pytest_prewarm.template(name)


REGISTERED_CONFTEST = """
    import pytest_prewarm

    import prewarm_probe as probe


    @pytest_prewarm.template("db", key="schema-7")
    def build_db(path):
        probe.count_attempt(path)
        (path / "schema.sql").write_text("create table users (id integer);")
        return {"tables": ["users"]}


    # The same function registered again (as a re-imported conftest would) is no conflict.
    pytest_prewarm.template("db", key="schema-7")(build_db)


    @pytest_prewarm.template("cache")
    def build_cache(path):
        return None
"""

REGISTERED_TESTS = """
    import pytest

    from pytest_prewarm import PrewarmUsageError


    def test_registered_builder_is_used_without_a_build_argument(prewarmed_template):
        template = prewarmed_template("db")
        assert template.value == {"tables": ["users"]}
        assert template.key == "schema-7"
        assert (template / "schema.sql").read_text().startswith("create table")


    def test_unknown_name_lists_the_registered_ones(prewarmed_template):
        with pytest.raises(PrewarmUsageError) as info:
            prewarmed_template("nope")
        text = str(info.value)
        assert "template 'nope' has no builder" in text
        assert "registered: cache, db" in text
        assert "@pytest_prewarm.template('nope')" in text
"""


def test_registered_builders_work_end_to_end_and_unknown_names_list_the_known(suite):
    suite.write(conftest=REGISTERED_CONFTEST, test_registered=REGISTERED_TESTS)

    result = suite.run("-n", "0")

    result.assert_outcomes(passed=2)
    (attempt,) = suite.attempts()
    assert attempt["worker"] == "main"


def test_two_conftests_registering_one_name_differently_fail_naming_both(suite):
    suite.write(
        conftest="""
            import pytest_prewarm


            @pytest_prewarm.template("db")
            def build_db(path):
                pass
        """
    )
    sub = suite.path / "sub"
    sub.mkdir()
    (sub / "conftest.py").write_text(
        "import pytest_prewarm\n\n\n"
        '@pytest_prewarm.template("db")\n'
        "def build_other_db(path):\n"
        "    pass\n"
    )
    (sub / "test_sub.py").write_text("def test_nothing():\n    pass\n")

    result = suite.run("-p", "no:xdist")

    assert result.ret != 0
    output = result.stdout.str() + result.stderr.str()
    assert "template 'db' is registered twice with different builders" in output
    assert f"{suite.path / 'conftest.py'}:4 (build_db)" in output
    assert f"{sub / 'conftest.py'}:4 (build_other_db)" in output
    result.assert_outcomes(errors=1)
