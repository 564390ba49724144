"""The ``@pytest.mark.prewarm("db", ...)`` marker: one signature, parsed by Python."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from .exceptions import PrewarmUsageError
from .names import check_name
from .registry import REGISTRY


def prewarm(*names: str) -> tuple[str, ...]:
    # Called with the marker's own args/kwargs, so Python reports a keyword argument or a
    # wrong call the usual way (TypeError), exactly like calling a function.
    return names


def marker_names(item: pytest.Item) -> list[str]:
    """Template names the item needs, closest marker first, without repeats.

    Raises PrewarmUsageError naming the test when a marker is malformed or names a
    template without a registered builder.
    """
    names: list[str] = []
    for mark in _marks(item):
        for name in _valid_names(item, mark):
            if name not in names:
                names.append(name)
    return names


def _marks(item: pytest.Item) -> Iterator[pytest.Mark]:
    """The prewarm marks of ``item`` and its parents, closest first (as ``iter_markers``).

    Walked by hand: ``iter_markers`` builds the whole node chain on every call, a cost
    that shows when 10,000 marked tests are collected.
    """
    node: pytest.Item | pytest.Collector | None = item
    while node is not None:
        for mark in node.own_markers:
            if mark.name == "prewarm":
                yield mark
        node = node.parent


# Marker arguments already found valid, so 10,000 tests marked alike are checked once
# (collection with the plugin must cost about what it costs without). Only valid ones
# are kept: builders are only ever added during a session, and ``forget`` empties it at
# the session's end, when the registry is restored.
_VALID: dict[tuple[Any, ...], tuple[str, ...]] = {}


def forget() -> None:
    _VALID.clear()


def _valid_names(item: pytest.Item, mark: pytest.Mark) -> tuple[str, ...]:
    key: tuple[Any, ...] | None = (mark.args, tuple(sorted(mark.kwargs.items())))
    try:
        known = _VALID.get(key)  # type: ignore[arg-type]
    except TypeError:  # an unhashable argument: checked below, and reported as invalid
        key, known = None, None
    if known is not None:
        return known
    try:
        given = prewarm(*mark.args, **mark.kwargs)
        if not given:
            raise TypeError('needs at least one template name, e.g. prewarm("db")')
        for name in given:
            check_name(name)
    except (TypeError, PrewarmUsageError) as exc:
        raise PrewarmUsageError(
            f"{item.nodeid}: invalid marker {_show(mark)}: {exc}. "
            'Use @pytest.mark.prewarm("name", ...) with registered template names.'
        ) from exc
    for name in given:
        if REGISTRY.get(name) is None:
            raise PrewarmUsageError(
                f"{item.nodeid}: @pytest.mark.prewarm names template {name!r}, which has "
                f"no registered builder (registered: {', '.join(REGISTRY.names()) or 'none'})."
                f" Register one with @pytest_prewarm.template({name!r}) in a conftest.py."
            )
    if key is not None:
        _VALID[key] = given
    return given


def needed_by(items: Iterable[pytest.Item]) -> list[str]:
    """Templates needed by the selected items, in first-use order."""
    seen: dict[str, None] = {}
    for item in items:
        for name in marker_names(item):
            seen.setdefault(name, None)
    return list(seen)


def _show(mark: pytest.Mark) -> str:
    args = [repr(a) for a in mark.args] + [f"{k}={v!r}" for k, v in mark.kwargs.items()]
    return f"@pytest.mark.prewarm({', '.join(args)})"
