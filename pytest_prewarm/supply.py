"""Templates supplied from outside (``--prewarm-supply NAME=DIR``): used as published, never built.

CI may hand in a prebuilt wheel or a pre-filled cache; the plugin then uses that
directory as the template's path for every key, and never builds, changes, moves or
deletes it. Specs come from the command line, the environment variable and the ini file;
for one name the command line wins over the environment, which wins over the ini file.
"""

# No `from __future__ import annotations` here: see "What a module costs to load" in
# docs/architecture.md.
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from .exceptions import PrewarmUsageError
from .names import check_name

ENV_VAR = "PYTEST_PREWARM_SUPPLY"  # entries separated by os.pathsep, like PATH


class Supplied(NamedTuple):
    name: str
    path: Path
    source: str  # "--prewarm-supply", "PYTEST_PREWARM_SUPPLY", "ini prewarm_supply in ..."


def env_specs(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    return [part for part in environ.get(ENV_VAR, "").split(os.pathsep) if part.strip()]


def parse(specs: Iterable[tuple[str, str]], base: Path) -> dict[str, Supplied]:
    """``{name: Supplied}`` from ``(spec, source)`` pairs, highest precedence first.

    Each spec is ``NAME=DIR``; a relative DIR resolves against ``base`` (the directory
    pytest was started in). DIR must be an existing directory: a typo fails at start-up.
    """
    found: dict[str, Supplied] = {}
    for spec, source in specs:
        name, sep, where = spec.partition("=")
        name = name.strip()
        if not sep or not name or not where.strip():
            raise PrewarmUsageError(
                f"{spec!r} from {source} is not NAME=DIR; for example "
                "--prewarm-supply wheel=dist/ (the template 'wheel' is then that directory)"
            )
        try:
            check_name(name)
        except PrewarmUsageError as exc:
            raise PrewarmUsageError(f"{spec!r} from {source}: {exc}") from None
        try:
            path = Path(where.strip()).expanduser()
        except RuntimeError as exc:  # "~someone" who has no home on this machine
            raise PrewarmUsageError(f"{spec!r} from {source}: {exc}") from None
        path = path if path.is_absolute() else base / path
        if not path.is_dir():
            what = "does not exist" if not os.path.lexists(path) else "is not a directory"
            raise PrewarmUsageError(
                f"{spec!r} from {source}: {path} {what}; a supplied template must be an "
                "existing directory (build it first, or drop the option to let the plugin "
                "build it)"
            )
        if name not in found:  # the first source given wins
            found[name] = Supplied(name, Path(os.path.abspath(path)), source)
    return found
