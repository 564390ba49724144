"""The ``@pytest.mark.prewarm("db", ...)`` marker: one signature, parsed by Python."""

from __future__ import annotations

from collections.abc import Iterable

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
    for mark in item.iter_markers("prewarm"):
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
            if name not in names:
                names.append(name)
    return names


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
