"""A builder's value becomes the JSON every process receives, or one line saying what is wrong."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest

from pytest_prewarm import PrewarmUsageError
from pytest_prewarm.values import json_round_trip, type_name


def refusal(value: Any) -> str:
    """The message refusing ``value``, without the hint that every refusal ends with."""
    with pytest.raises(PrewarmUsageError) as info:
        json_round_trip(value, "db")
    message = str(info.value)
    assert message.startswith("builder of template 'db' returned ")
    assert message.endswith(
        "; return None, a str, int, float or bool, or a list or dict of "
        "those (an os.PathLike is taken as its str)"
    )
    assert "\n" not in message
    return message.removeprefix("builder of template 'db' returned ").split("; return None")[0]


class BytesPath:
    """An os.PathLike whose path is bytes, which JSON cannot hold as text."""

    def __fspath__(self) -> bytes:
        return b"/srv/db"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")


def test_json_values_come_back_as_json_would_give_them():
    value = {"port": 5432, "ok": True, "none": None, "pair": (1, 2.5), "name": "db"}

    assert json_round_trip(value, "db") == {
        "port": 5432,
        "ok": True,
        "none": None,
        "pair": [1, 2.5],
        "name": "db",
    }


def test_paths_anywhere_become_their_str_without_a_build_dir(tmp_path):
    value = {"db": tmp_path / "db.sqlite", "all": [tmp_path, ("x", Path("rel/a.sql"))]}

    assert json_round_trip(value, "db") == {
        "db": str(tmp_path / "db.sqlite"),
        "all": [str(tmp_path), ["x", "rel/a.sql"]],
    }


def test_paths_as_dict_keys_become_their_str_and_other_keys_stay_json_keys(tmp_path):
    value = {tmp_path / "a": 1, 2: [tmp_path / "b"], 1.5: "f", None: "n", "s": 0.25}

    assert json_round_trip(value, "db") == {
        str(tmp_path / "a"): 1,
        "2": [str(tmp_path / "b")],
        "1.5": "f",
        "null": "n",
        "s": 0.25,
    }


def test_paths_in_a_value_become_their_str_where_they_are_as_keys_and_values(tmp_path):
    # The build dir is the published template (in place): nothing is rewritten.
    data = tmp_path / "templates" / "db" / "1-0badc0de" / "data"
    value = {"db": data / "db.sqlite", "itself": data, data / "key": "a path key too"}

    assert json_round_trip(value, "db") == {
        "db": str(data / "db.sqlite"),
        "itself": str(data),
        str(data / "key"): "a path key too",
    }


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({1, 2}, "set {1, 2}, which is not JSON-serialisable"),
        (
            float("nan"),
            "float nan, which is not JSON-serialisable (JSON has no NaN or infinity)",
        ),
        (BytesPath(), "test_values.BytesPath <test_values.BytesPath object at"),
        (b"raw", "bytes b'raw', which is not JSON-serialisable"),
    ],
)
def test_a_value_that_is_not_json_is_refused_naming_its_type(value, words):
    assert words in refusal(value)


def test_something_deep_inside_is_named_by_where_it_sits():
    value = {"servers": [{"port": 1}, {"port": 2, "sock": {3}}]}

    assert refusal(value) == (
        "dict whose ['servers'][1]['sock'] is set {3}, which is not JSON-serialisable"
    )


def test_an_infinity_in_a_list_is_named_by_its_index():
    assert refusal([1.5, float("-inf")]) == (
        "list whose [1] is float -inf, which is not JSON-serialisable (JSON has no NaN or infinity)"
    )


def test_a_path_of_bytes_inside_a_value_says_so():
    message = refusal({"where": BytesPath()})

    assert message.startswith("dict whose ['where'] is test_values.BytesPath <")
    assert message.endswith("> of bytes, which is not JSON-serialisable")


def test_a_key_that_json_cannot_hold_is_named_with_the_reason():
    assert refusal({(1, 2): "pair"}) == (
        "dict with a key tuple (1, 2), which is not JSON-serialisable (JSON keys are strings)"
    )
    assert refusal({"inner": {BytesPath(): 1}}).startswith(
        "dict whose ['inner'] is dict with a key test_values.BytesPath <"
    )


def test_a_value_that_contains_itself_is_refused_not_recursed_into_forever():
    loop: list[Any] = [1]
    loop.append(loop)

    assert refusal({"a": loop}) == (
        "dict whose ['a'][1] is list that contains itself, which is not JSON-serialisable"
    )


def test_the_same_list_twice_is_no_cycle():
    shared = [Path("x")]

    assert json_round_trip({"a": shared, "b": shared, Path("k"): 0}, "db") == {
        "a": ["x"],
        "b": ["x"],
        "k": 0,
    }


def test_a_value_nested_too_deeply_is_refused_in_one_line():
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]

    assert refusal(deep) == "list nested too deeply to be JSON-serialisable"


def test_a_repr_that_fails_or_runs_long_still_gives_one_short_line():
    broken = refusal({"x": BadRepr()})
    long = refusal({"x": {"line\n" * 40}})

    assert broken == (
        "dict whose ['x'] is test_values.BadRepr <BadRepr>, which is not JSON-serialisable"
    )
    shown = long.removeprefix("dict whose ['x'] is set ").split(", which is not")[0]
    assert len(shown) == 80
    assert shown.startswith("{'line\\nline\\n")
    assert shown.endswith("...")


def test_type_names_drop_builtins_and_our_exceptions_module_but_keep_other_modules():
    assert type_name(int) == "int"
    assert type_name(PrewarmUsageError) == "PrewarmUsageError"
    assert type_name(collections.OrderedDict) == "collections.OrderedDict"
    assert type_name(BadRepr) == "test_values.BadRepr"
