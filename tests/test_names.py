"""Template names and keys become safe, distinct file names, or fail clearly."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_prewarm import PrewarmUsageError
from pytest_prewarm.names import (
    MAX_NAME_LENGTH,
    canonical_key,
    check_name,
    file_stem,
    key_digest,
)

# One path component of safe characters, and not hidden (no leading dot).
SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.~-]*")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # refused in names


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "template name is empty"),
        ("  \t", "template name is empty"),
        ("a\x00b", "template name 'a\\x00b' contains a NUL character"),
        ("db\x1b]0;x\x07", "template name 'db\\x1b]0;x\\x07' contains a control character"),
        ("a\nb", "template name 'a\\nb' contains a control character"),
        ("a\x9bb", "template name 'a\\x9bb' contains a control character"),
        ("x" * (MAX_NAME_LENGTH + 1), "is 201 characters long; the limit is 200"),
        (42, "template name must be a str, got int 42"),
        (None, "template name must be a str, got NoneType None"),
        (b"db", "template name must be a str, got bytes b'db'"),
        (("db",), "template name must be a str, got tuple"),
    ],
)
def test_unusable_names_raise_a_usage_error_that_says_what_is_wrong(name, message):
    with pytest.raises(PrewarmUsageError) as info:
        check_name(name)

    assert message in str(info.value)


def test_a_name_of_exactly_the_limit_is_accepted():
    assert check_name("x" * MAX_NAME_LENGTH) == "x" * MAX_NAME_LENGTH


def test_usage_errors_are_value_errors_too():
    with pytest.raises(ValueError, match="empty"):
        check_name("")


@pytest.mark.parametrize("name", ["db", "venv-3.12", "pg_16", "A1.b-c"])
def test_plain_names_are_their_own_file_names(name):
    assert file_stem(name) == name


@pytest.mark.parametrize(
    "name", ["..", ".", "../x", "../../etc/passwd", "a/b", "/abs", "a\\b", "~", " db", "Ünï"]
)
def test_path_like_names_become_one_safe_path_component(name):
    stem = file_stem(name)

    assert SAFE_COMPONENT.fullmatch(stem), stem
    assert stem not in (".", "..")
    assert "/" not in stem
    assert "\x00" not in stem


def test_names_that_clean_up_alike_stay_distinct():
    names = ["a/b", "a_b", "a\\b", "a b", "a:b", "a//b", "a/./b"]

    assert len({file_stem(name) for name in names}) == len(names)


def test_a_plain_name_cannot_collide_with_the_file_name_of_an_unsafe_name():
    # "a/b" is stored under a cleaned name plus a digest. A user who names another
    # template exactly that string must not get the "a/b" template (same lock, same dir).
    unsafe = "a/b"
    lookalike = file_stem(unsafe)

    assert file_stem(lookalike) != file_stem(unsafe)


@given(st.text(min_size=1, max_size=MAX_NAME_LENGTH).filter(lambda s: s.strip()))
def test_any_valid_name_maps_to_a_short_safe_path_component(name):
    name = check_name(CONTROL.sub("_", name))

    stem = file_stem(name)

    assert SAFE_COMPONENT.fullmatch(stem), (name, stem)
    assert stem not in (".", "..")
    assert len(stem) <= 64


@given(
    st.text(min_size=1, max_size=40).filter(lambda s: s.strip() and "\x00" not in s),
    st.text(min_size=1, max_size=40).filter(lambda s: s.strip() and "\x00" not in s),
)
def test_different_names_map_to_different_file_names(first, second):
    if first != second:
        assert file_stem(first) != file_stem(second)


def test_keys_are_canonical_json_so_equal_keys_match_across_runs():
    assert canonical_key({"b": 1, "a": [1, "x"]}, name="db") == '{"a":[1,"x"],"b":1}'
    assert canonical_key({"a": [1, "x"], "b": 1}, name="db") == canonical_key(
        {"b": 1, "a": [1, "x"]}, name="db"
    )
    assert key_digest(canonical_key("v1", name="db")) != key_digest(canonical_key("v2", name="db"))
    assert key_digest(canonical_key(None, name="db")) != key_digest(
        canonical_key("null", name="db")
    )


@pytest.mark.parametrize("key", [object(), {1, 2}, float("nan"), b"bytes"])
def test_a_key_that_is_not_json_is_a_usage_error_naming_the_template(key):
    with pytest.raises(PrewarmUsageError) as info:
        canonical_key(key, name="db")

    assert "of template 'db' is not JSON-serialisable" in str(info.value)
