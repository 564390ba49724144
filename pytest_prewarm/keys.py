"""The cache key of a test selection: which templates it needs, by name and key.

A CI cache step keys the restored lock dir on this text (GitHub Actions:
``hashFiles('prewarm-keys.txt')``), so the cache is reused while the templates' names and
keys stay the same, and a new cache entry is made when one changes. It holds nothing that
changes from run to run (no digests, paths or times), and its lines are sorted.
"""

from __future__ import annotations

from collections.abc import Iterable

from .events import TemplateEvent
from .request import Request, Template

HEADER = "# pytest-prewarm template keys, format 1: name<TAB>canonical key<TAB>layers\n"


def _line(name: str, key: str, layers: Iterable[str]) -> str:
    return f"{_escape(name)}\t{_escape(key)}\t{','.join(_escape(n) for n in sorted(layers))}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def from_requests(requests: Iterable[Request], canonical: dict[str, str]) -> str:
    """The keys of ``requests`` and of the registered layers they are built on.

    ``canonical`` maps a template's name to its canonical key (the caller computes it, so
    a bad key fails there, with the message of a request).
    """
    lines: set[str] = set()
    pending = list(requests)
    while pending:
        request = pending.pop()
        layers = []
        for layer in request.requires:
            if isinstance(layer, Template):
                layers.append(layer.name)
            else:
                layers.append(layer.name)
                pending.append(layer)
        lines.add(_line(request.name, canonical[request.name], layers))
    return HEADER + "".join(f"{line}\n" for line in sorted(lines))


def from_events(events: Iterable[TemplateEvent]) -> str:
    """The keys of the templates a run got, from its events (a supplied one: its name)."""
    lines = {_line(e.template, e.key or "", ()) for e in events if e.outcome != "timeout"}
    return HEADER + "".join(f"{line}\n" for line in sorted(lines))
