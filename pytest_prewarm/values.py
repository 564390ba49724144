"""A builder's return value as JSON: what every process receives as ``Template.value``.

An ``os.PathLike`` anywhere in the value is taken as its str; anything else that JSON
cannot hold is refused in one line that names its type and where it sits.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .exceptions import PrewarmUsageError

_JSON_HINT = (
    "return None, a str, int, float or bool, or a list or dict of those (an os.PathLike "
    "is taken as its str)"
)


class _NotJSON(Exception):
    """What in a builder's value is not JSON, in words; ``where`` is its subscript path."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(where, what)
        self.where = where
        self.what = what


def json_round_trip(returned: Any, name: str) -> Any:
    """The value as every process receives it: its JSON round trip.

    An os.PathLike anywhere in it becomes its str (``str(os.fspath(value))``): the build
    dir is the published template, so a path into it stays true. Anything else that is
    not JSON is refused in one line naming its type and where it sits.
    """
    convert = _ToJSON()
    try:
        text = json.dumps(returned, allow_nan=False, default=convert.default)
    except (TypeError, ValueError, RecursionError):
        try:  # find what is wrong, or convert what only the slow path reaches (path keys)
            text = json.dumps(convert.value(returned, ""), allow_nan=False)
        except _NotJSON as exc:
            problem = exc.what
            if exc.where:
                problem = f"{_type_of(returned)} whose {exc.where} is {problem}"
        except (TypeError, ValueError, RecursionError):
            problem = f"{_type_of(returned)} nested too deeply to be JSON-serialisable"
        else:
            return json.loads(text)
        raise PrewarmUsageError(
            f"builder of template {name!r} returned {problem}; {_JSON_HINT}"
        ) from None
    return json.loads(text)


_NOT_JSON = "which is not JSON-serialisable"


class _ToJSON:
    """Paths as str (a template is used where it was built), tuples as lists; raises
    _NotJSON naming the first thing that JSON cannot hold."""

    def __init__(self) -> None:
        self.active: set[int] = set()  # containers on the way down: a cycle is an error

    def path(self, value: os.PathLike[Any]) -> str | None:
        path = os.fspath(value)
        if not isinstance(path, str):
            return None
        return path

    def default(self, value: Any) -> str:
        """json.dumps's hook for what it cannot encode itself."""
        path = self.path(value) if isinstance(value, os.PathLike) else None
        if path is None:
            raise TypeError(type(value).__name__)
        return path

    def value(self, value: Any, where: str) -> Any:
        """``value`` made JSON; ``where`` is its subscript path inside the returned value."""
        if value is None or isinstance(value, str | int):  # bool is an int
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            raise _NotJSON(where, f"float {value!r}, {_NOT_JSON} (JSON has no NaN or infinity)")
        if isinstance(value, os.PathLike):
            path = self.path(value)
            if path is None:
                raise _NotJSON(where, f"{_described(value)} of bytes, {_NOT_JSON}")
            return path
        if not isinstance(value, list | tuple | dict):
            raise _NotJSON(where, f"{_described(value)}, {_NOT_JSON}")
        if id(value) in self.active:
            raise _NotJSON(where, f"{_type_of(value)} that contains itself, {_NOT_JSON}")
        self.active.add(id(value))
        try:
            if isinstance(value, dict):
                return {
                    self.key(k, where): self.value(v, f"{where}[{_short_repr(k)}]")
                    for k, v in value.items()
                }
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(value)]
        finally:
            self.active.discard(id(value))

    def key(self, key: Any, where: str) -> Any:
        if key is None or isinstance(key, str | int | float):
            return key
        path = self.path(key) if isinstance(key, os.PathLike) else None
        if path is None:
            raise _NotJSON(
                where, f"dict with a key {_described(key)}, {_NOT_JSON} (JSON keys are strings)"
            )
        return path


def _described(value: Any) -> str:
    return f"{_type_of(value)} {_short_repr(value)}"


def _type_of(value: Any) -> str:
    return type_name(type(value))


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n")  # the error is one line
    return text if len(text) <= 80 else text[:77] + "..."


def type_name(cls: type) -> str:
    name = f"{cls.__module__}.{cls.__qualname__}"
    return name.removeprefix("builtins.").removeprefix("pytest_prewarm.exceptions.")
