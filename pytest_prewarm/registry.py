"""Builders registered by name with ``@pytest_prewarm.template("db")``."""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .exceptions import PrewarmUsageError
from .names import check_name

Builder = Callable[..., Any]  # build(path), or build(path, layers) with requires=
Configure = Callable[[Any], object]  # configure(template), in every process that gets it
Teardown = Callable[[Path, Any], object]


class Registered(NamedTuple):
    name: str
    build: Builder
    key: Any
    where: str  # "conftest.py:12 (build_db)", for error messages
    configure: Configure | None = None
    requires: tuple[str, ...] = ()
    teardown: Teardown | None = None


def _where(func: Callable[..., Any]) -> str:
    func = inspect.unwrap(func)
    try:
        filename = inspect.getsourcefile(func) or "<unknown>"
        line = inspect.getsourcelines(func)[1]
    except (OSError, TypeError):
        filename, line = "<unknown>", 0
    return f"{filename}:{line} ({getattr(func, '__qualname__', repr(func))})"


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    # A conftest imported twice (rootdir/confcutdir quirks, importlib mode) gives two
    # function objects for one definition; that is not a conflict.
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        code_a is not None
        and code_b is not None
        and code_a.co_filename == code_b.co_filename
        and code_a.co_firstlineno == code_b.co_firstlineno
    )


class Registry:
    def __init__(self) -> None:
        self._builders: dict[str, Registered] = {}

    def add(
        self,
        name: str,
        build: Builder,
        key: Any = None,
        *,
        configure: Configure | None = None,
        requires: tuple[str, ...] = (),
        teardown: Teardown | None = None,
    ) -> Registered:
        check_name(name)
        if not callable(build):
            raise PrewarmUsageError(f"builder for template {name!r} is not callable: {build!r}")
        if configure is not None and not callable(configure):
            raise PrewarmUsageError(
                f"configure= for template {name!r} is not callable: {configure!r}"
            )
        for required in requires:
            if not isinstance(required, str):
                raise PrewarmUsageError(
                    f"requires= of template {name!r} names {required!r}; give the names of "
                    "registered templates, as strings"
                )
        entry = Registered(name, build, key, _where(build), configure, tuple(requires), teardown)
        existing = self._builders.get(name)
        if existing is not None and not _same_function(existing.build, build):
            raise PrewarmUsageError(
                f"template {name!r} is registered twice with different builders: "
                f"{existing.where} and {entry.where}; rename one of them"
            )
        self._builders[name] = entry
        return entry

    def get(self, name: str) -> Registered | None:
        return self._builders.get(name)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def snapshot(self) -> dict[str, Registered]:
        return dict(self._builders)

    def restore(self, snapshot: dict[str, Registered]) -> None:
        self._builders = dict(snapshot)


# One registry per process: conftests register at import, before any session exists.
REGISTRY = Registry()


def template(
    name: str,
    *,
    key: Any = None,
    configure: Configure | None = None,
    requires: tuple[str, ...] | list[str] = (),
    teardown: Teardown | None = None,
) -> Callable[[Builder], Builder]:
    """Register the decorated function as the builder of template ``name``.

    The function receives an empty directory (a :class:`pathlib.Path`) to fill, and may
    return a JSON-serialisable value that every user of the template receives as
    ``Template.value``. ``key`` versions the template: a published template is reused
    by later runs (with an explicit lock dir) only while its key is equal.
    ``configure(template)`` runs once in every process that gets the template, the
    builder's included: the place for environment variables, app config, connections.
    ``requires`` names the templates this one is built on: the builder is then called as
    ``build(path, layers)``, and a change to a layer rebuilds this template too.

    ``teardown(path, value)``, a function defined at module level, is called exactly once
    per built template after the last test of the run (of every run sharing it) that
    could use it, even when the run is killed; see docs/usage.md, "Services".

    Example, in a ``conftest.py``::

        @pytest_prewarm.template("db")
        def build_db(path):
            create_database(path / "db.sqlite3")
    """
    check_name(name)
    if isinstance(requires, str):
        requires = (requires,)

    if teardown is not None:
        from .teardown import reference  # lazily, as in request.make_request

        reference(teardown, name)

    def decorate(build: Builder) -> Builder:
        REGISTRY.add(
            name, build, key, configure=configure, requires=tuple(requires), teardown=teardown
        )
        return build

    return decorate
