"""Turning template events into the terminal summary and the JSON report; no pytest here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from .events import TemplateEvent
from .kinds import Outcome

JSON_SCHEMA_VERSION = 1
HIDE_WAITS_UNDER = 0.05  # seconds; shorter waits are noise and hidden unless -vv


@dataclass
class TemplateSummary:
    name: str
    builds: list[TemplateEvent] = field(default_factory=list)
    failures: list[TemplateEvent] = field(default_factory=list)  # the failed build itself
    waits: list[TemplateEvent] = field(default_factory=list)  # waited, failed fast, timed out
    reused: list[TemplateEvent] = field(default_factory=list)
    recoveries: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why it was rebuilt, or verified
    supplied: list[TemplateEvent] = field(default_factory=list)

    @property
    def wait_total(self) -> float:
        return sum(e.wait_seconds for e in self.waits)

    @property
    def wait_longest(self) -> float:
        return max((e.wait_seconds for e in self.waits), default=0.0)

    def outcome_code(self) -> str:
        """One word for dashboards: built, failed, timeout, reused, supplied or unused."""
        if self.supplied:
            return "supplied"
        if self.builds:
            return "built"
        if self.failures:
            return "failed"
        if any(e.outcome == Outcome.TIMEOUT for e in self.waits):
            return "timeout"
        if self.reused or self.waits:
            return "reused"
        return "unused"

    def outcome(self) -> str:
        code = self.outcome_code()
        if code == "built":
            parts = [f"built by {e.worker} in {_secs(e.build_seconds or 0.0)}" for e in self.builds]
            return "; ".join(parts)
        if code == "failed":
            first = self.failures[0]
            message = (first.error or "").splitlines()[0] if first.error else "error"
            return f"failed in {first.worker} after {_secs(first.build_seconds or 0.0)}: {message}"
        if code == "supplied":
            return f"supplied: {self.supplied[0].built_by}, not built"
        verified = [e for e in self.reused + self.waits if e.note and "verified" in e.note]
        if code == "reused" and verified:
            return (
                f"reused: restored from another boot and verified, built by {verified[0].built_by}"
            )
        others = [e for e in self.waits if e.outcome == Outcome.WAITED and e.built_by]
        if code == "reused" and others:
            return f"built by another run ({others[0].built_by}) while this one waited"
        return {
            "timeout": "not built: timed out waiting for the lock",
            "reused": "reused (published before this run)",
        }.get(code, "not built")


def summarize(events: Iterable[TemplateEvent]) -> list[TemplateSummary]:
    """Group events by template, in first-seen order."""
    by_name: dict[str, TemplateSummary] = {}
    for event in events:
        summary = by_name.get(event.template)
        if summary is None:  # not setdefault: a summary made per event cost 10,000 objects
            summary = by_name[event.template] = TemplateSummary(event.template)
        if event.outcome == Outcome.WAITED:  # the common case first; it is only a wait
            summary.waits.append(event)
        elif event.outcome == Outcome.SUPPLIED:
            summary.supplied.append(event)
        elif event.outcome == Outcome.BUILT:
            summary.builds.append(event)
            if event.recovered_from and event.wait_seconds > 0:
                # It waited for a builder that was then killed, and took over: a wait too.
                summary.waits.append(event)
        elif event.outcome == Outcome.FAILED and event.build_seconds is not None:
            summary.failures.append(event)
        elif event.outcome == Outcome.REUSED and event.wait_seconds == 0.0:
            summary.reused.append(event)
        elif event.outcome in (Outcome.WAITED, Outcome.FAILED, Outcome.TIMEOUT, Outcome.REUSED):
            summary.waits.append(event)
        if event.recovered_from:
            summary.recoveries.append(
                f"{event.worker} reclaimed the lock from {event.recovered_from}"
            )
        if event.note:
            summary.notes.append(f"{event.worker}: {event.note}")
    return list(by_name.values())


def _secs(value: float) -> str:
    return f"{value:.2f} s"


def teardown_lines(teardowns: Iterable[dict[str, Any]]) -> list[str]:
    """One line per teardown the run ran; a failed or hung one with its error below it."""
    lines = []
    for t in teardowns:
        head = f"{t['template']}  teardown by {t['run_by']}"
        if t["outcome"] == "ok":
            what = "stopped what its unfinished build started" if t.get("unfinished") else "done"
            lines.append(f"{head}: {what} in {_secs(t['seconds'])}")
            continue
        word = "FAILED" if t["outcome"] == "failed" else "HUNG"
        lines.append(f"{head}: {word} after {_secs(t['seconds'])}")
        lines.extend(f"    {line}" for line in (t["error"] or "").splitlines())
    return lines


def format_summary(
    events: list[TemplateEvent],
    *,
    top: int = 10,
    verbosity: int = 0,
    teardowns: Iterable[dict[str, Any]] = (),
    summaries: list[TemplateSummary] | None = None,
) -> list[str]:
    """The lines of the prewarm section (without its heading); empty when nothing happened.

    ``top`` limits the list of longest waits (0: all). ``verbosity`` is pytest's: below 0
    only the per-template lines; 2 and more also shows waits shorter than 0.05 s.
    ``teardowns`` (``teardown.Result.to_dict()`` of each) follow under "teardowns:".
    """
    torn = teardown_lines(teardowns)
    lines = _template_lines(events, top=top, verbosity=verbosity, summaries=summaries)
    if torn:
        lines += ([""] if lines else []) + ["teardowns:"] + torn
    return lines


def _template_lines(
    events: list[TemplateEvent],
    *,
    top: int,
    verbosity: int,
    summaries: list[TemplateSummary] | None,
) -> list[str]:
    summaries = summarize(events) if summaries is None else summaries
    if not summaries:
        return []
    width = max(len(s.name) for s in summaries)
    lines = []
    for summary in summaries:
        line = f"{summary.name:<{width}}  {summary.outcome()}"
        if summary.waits:
            line += (
                f"; {len(summary.waits)} waited, longest {_secs(summary.wait_longest)}, "
                f"total {_secs(summary.wait_total)}"
            )
        lines.append(line)
        lines.extend(f"{'':<{width}}  {text}" for text in summary.recoveries + summary.notes)
    if verbosity < 0:
        return lines
    waits = sorted(
        (e for s in summaries for e in s.waits), key=lambda e: e.wait_seconds, reverse=True
    )
    shown = waits if verbosity >= 2 else [e for e in waits if e.wait_seconds >= HIDE_WAITS_UNDER]
    hidden_short = len(waits) - len(shown)
    if top > 0 and len(shown) > top:
        hidden_top = len(shown) - top
        shown = shown[:top]
    else:
        hidden_top = 0
    if shown or hidden_short:
        lines.append("")
        lines.append("longest lock waits:")
        wwidth = max((len(e.worker) for e in shown), default=0)
        for event in shown:
            note = "" if event.outcome == Outcome.WAITED else f" ({event.outcome})"
            lines.append(
                f"{event.wait_seconds:8.2f}s  {event.worker:<{wwidth}}  {event.template}{note}"
            )
        if hidden_top:
            lines.append(f"({hidden_top} more waits not shown; use --prewarm-report 0 to show all)")
        if hidden_short:
            lines.append(
                f"({hidden_short} waits under {HIDE_WAITS_UNDER} s hidden; use -vv to show them)"
            )
    return lines


def to_json(
    events: list[TemplateEvent],
    settings: dict[str, Any],
    *,
    teardowns: Iterable[dict[str, Any]] = (),
    summaries: list[TemplateSummary] | None = None,
) -> dict[str, Any]:
    """The machine-readable report (schema documented in docs/report.md)."""
    templates = []
    for summary in summarize(events) if summaries is None else summaries:
        templates.append(
            {
                "name": summary.name,
                "outcome": summary.outcome_code(),
                "builds": [
                    {"worker": e.worker, "pid": e.pid, "seconds": e.build_seconds}
                    for e in summary.builds
                ],
                "failures": [
                    {"worker": e.worker, "pid": e.pid, "seconds": e.build_seconds, "error": e.error}
                    for e in summary.failures
                ],
                "waits": [
                    {
                        "worker": e.worker,
                        "pid": e.pid,
                        "seconds": e.wait_seconds,
                        "outcome": e.outcome,
                    }
                    for e in summary.waits
                ],
                "wait_total_seconds": summary.wait_total,
                "wait_longest_seconds": summary.wait_longest,
                "recoveries": summary.recoveries,
                "notes": summary.notes,
            }
        )
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "settings": settings,
        "templates": templates,
        "events": [e.to_dict() for e in events],
        "teardowns": list(teardowns),  # added in schema 1: a new field, not a change
    }


def dumps(data: dict[str, Any]) -> str:
    """The JSON report's text: indented, but a list of flat records on one line.

    ``json.dumps(indent=...)`` runs the pure-Python encoder, and even one C-encoder call
    per record costs about 5 us: 10,000 waits (in ``events`` and in their templates'
    ``waits``) took 100 ms and more to write that way. A list of flat records (events,
    waits, builds) goes through the C encoder in one call, on one line.
    """
    return _encode(data, 0) + "\n"


def _encode(value: Any, depth: int) -> str:
    pad = "  " * depth
    if isinstance(value, dict) and value:
        rows = [f"{pad}  {json.dumps(k)}: {_encode(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(rows) + f"\n{pad}}}"
    if isinstance(value, list) and not _flat_list(value):
        rows = [f"{pad}  {_encode(item, depth + 1)}" for item in value]
        return "[\n" + ",\n".join(rows) + f"\n{pad}]"
    return json.dumps(value)


def _flat_list(items: list[Any]) -> bool:
    """Whether no item is a list and no dict item holds a dict or a list."""
    if _DICT_ONLY.issuperset(map(type, items)):
        # 10,000 events and 10,000 waits: every value's type gathered in C, no call per record.
        return _NESTED.isdisjoint(map(type, chain.from_iterable(map(dict.values, items))))
    return all(map(_flat, items))


def _flat(item: Any) -> bool:
    if isinstance(item, dict):
        return _NESTED.isdisjoint(map(type, item.values()))
    return not isinstance(item, list)


_NESTED = frozenset((dict, list))
_DICT_ONLY = frozenset((dict,))
