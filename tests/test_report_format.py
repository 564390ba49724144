"""Unit tests of report.py: events in, summary lines and the JSON report out (no pytester)."""

from __future__ import annotations

import json
import re

import pytest

from pytest_prewarm import report
from pytest_prewarm.events import TemplateEvent
from pytest_prewarm.kinds import Outcome

BUILT, FAILED, REUSED, TIMEOUT, WAITED = (
    Outcome.BUILT,
    Outcome.FAILED,
    Outcome.REUSED,
    Outcome.TIMEOUT,
    Outcome.WAITED,
)


def built(name: str, worker: str, seconds: float, **kw: object) -> TemplateEvent:
    return TemplateEvent(name, worker, BUILT, build_seconds=seconds, built_by=worker, **kw)  # type: ignore[arg-type]


def waited(name: str, worker: str, seconds: float, built_by: str = "gw0") -> TemplateEvent:
    return TemplateEvent(name, worker, WAITED, wait_seconds=seconds, built_by=built_by)


def failed_build(name: str, worker: str, seconds: float, error: str) -> TemplateEvent:
    return TemplateEvent(
        name, worker, FAILED, build_seconds=seconds, built_by=worker, error=error, pid=4100
    )


def failed_fast(name: str, worker: str, seconds: float = 0.0) -> TemplateEvent:
    return TemplateEvent(
        name, worker, FAILED, wait_seconds=seconds, built_by="gw0", error="ValueError: boom"
    )


def wait_rows(lines: list[str]) -> list[str]:
    """The rows of the "longest lock waits:" list."""
    return [line for line in lines if re.match(r"^ *\d+\.\d\ds  ", line)]


# -- the per-template lines ---------------------------------------------------------------


def test_no_events_give_no_lines_at_all() -> None:
    assert report.format_summary([]) == []
    assert report.format_summary([], verbosity=2, top=0) == []


def test_a_built_template_names_its_builder_and_build_time() -> None:
    assert report.format_summary([built("db", "gw2", 1.5)]) == ["db  built by gw2 in 1.50 s"]


def test_waiters_are_counted_with_the_longest_and_total_wait() -> None:
    events = [built("db", "gw0", 2.0), waited("db", "gw1", 1.25), waited("db", "gw3", 0.5)]
    lines = report.format_summary(events)
    assert lines[0] == "db  built by gw0 in 2.00 s; 2 waited, longest 1.25 s, total 1.75 s"


def test_template_names_are_padded_to_one_column_in_first_seen_order() -> None:
    events = [
        built("venv-3.12", "gw1", 0.1),
        built("db", "gw0", 0.2),
        waited("venv-3.12", "gw0", 1),
    ]
    lines = report.format_summary(events, verbosity=-1)
    assert lines == [
        "venv-3.12  built by gw1 in 0.10 s; 1 waited, longest 1.00 s, total 1.00 s",
        "db         built by gw0 in 0.20 s",
    ]


def test_a_failed_build_shows_the_worker_and_only_the_first_line_of_the_error() -> None:
    events = [
        failed_build("db", "gw1", 0.25, "RuntimeError: no disk\nsecond line\nthird"),
        failed_fast("db", "gw0"),
    ]
    lines = report.format_summary(events, verbosity=-1)
    assert lines == [
        "db  failed in gw1 after 0.25 s: RuntimeError: no disk; "
        "1 waited, longest 0.00 s, total 0.00 s"
    ]


def test_a_template_whose_waiters_timed_out_is_reported_as_not_built() -> None:
    events = [TemplateEvent("db", "gw1", TIMEOUT, wait_seconds=30.0, error="timed out")]
    lines = report.format_summary(events, verbosity=-1)
    assert lines == [
        "db  not built: timed out waiting for the lock; 1 waited, longest 30.00 s, total 30.00 s"
    ]


def test_a_template_published_before_the_run_is_reported_as_reused() -> None:
    events = [TemplateEvent("db", "gw0", REUSED), TemplateEvent("db", "gw1", REUSED)]
    assert report.format_summary(events) == ["db  reused (published before this run)"]


def test_a_recovery_is_listed_under_its_template_naming_the_dead_holder() -> None:
    events = [
        built("db", "gw1", 1.0, recovered_from="gw0, pid 4100: dead, no such process"),
        built("cache", "gw0", 0.5),
    ]
    lines = report.format_summary(events, verbosity=-1)
    assert lines == [
        "db     built by gw1 in 1.00 s",
        "       gw1 reclaimed the lock from gw0, pid 4100: dead, no such process",
        "cache  built by gw0 in 0.50 s",
    ]


def test_two_builds_of_one_name_are_both_listed() -> None:
    # Two keys of one name are two templates with two builds, shown on one line.
    lines = report.format_summary([built("db", "gw0", 1.0), built("db", "gw1", 2.0)])
    assert lines == ["db  built by gw0 in 1.00 s; built by gw1 in 2.00 s"]


# -- the list of longest waits ------------------------------------------------------------


def test_the_longest_waits_are_listed_sorted_and_aligned_after_a_blank_line() -> None:
    events = [
        built("db", "gw0", 2.0),
        waited("db", "gw1", 0.5),
        waited("db", "gw10", 12.25),
        built("venv", "gw1", 1.0),
        waited("venv", "gw2", 0.75),
    ]
    lines = report.format_summary(events)
    start = lines.index("longest lock waits:")
    assert lines[start - 1] == ""
    assert lines[start + 1 :] == [
        "   12.25s  gw10  db",
        "    0.75s  gw2   venv",
        "    0.50s  gw1   db",
    ]


def test_waits_that_did_not_end_in_a_template_are_labelled_with_their_outcome() -> None:
    events = [
        failed_build("db", "gw0", 0.1, "OSError: x"),
        failed_fast("db", "gw1", 0.5),
        TemplateEvent("venv", "gw2", TIMEOUT, wait_seconds=9.0),
    ]
    assert wait_rows(report.format_summary(events)) == [
        "    9.00s  gw2  venv (timeout)",
        "    0.50s  gw1  db (failed)",
    ]


def test_waits_under_a_twentieth_of_a_second_are_hidden_with_a_count_and_a_hint() -> None:
    events = [built("db", "gw0", 1.0), waited("db", "gw1", 0.8)]
    events += [waited("db", f"gw{i}", 0.049) for i in range(2, 5)]
    events += [failed_fast("x", "gw5", 0.0)]
    lines = report.format_summary(events)
    assert wait_rows(lines) == ["    0.80s  gw1  db"]
    assert lines[-1] == "(4 waits under 0.05 s hidden; use -vv to show them)"


def test_a_wait_of_exactly_the_threshold_is_shown() -> None:
    lines = report.format_summary([built("db", "gw0", 1.0), waited("db", "gw1", 0.05)])
    assert wait_rows(lines) == ["    0.05s  gw1  db"]
    assert not any("hidden" in line for line in lines)


def test_only_short_waits_still_print_the_heading_and_the_hint() -> None:
    lines = report.format_summary([built("db", "gw0", 1.0), waited("db", "gw1", 0.01)])
    assert lines[1:] == [
        "",
        "longest lock waits:",
        "(1 waits under 0.05 s hidden; use -vv to show them)",
    ]


def test_very_verbose_shows_the_short_waits_too() -> None:
    events = [built("db", "gw0", 1.0), waited("db", "gw1", 0.8), waited("db", "gw2", 0.01)]
    lines = report.format_summary(events, verbosity=2)
    assert wait_rows(lines) == ["    0.80s  gw1  db", "    0.01s  gw2  db"]
    assert not any("hidden" in line for line in lines)


def test_plain_verbose_still_hides_short_waits() -> None:
    events = [built("db", "gw0", 1.0), waited("db", "gw2", 0.01)]
    assert "(1 waits under 0.05 s hidden; use -vv to show them)" in report.format_summary(
        events, verbosity=1
    )


def test_quiet_gives_only_the_per_template_lines() -> None:
    events = [built("db", "gw0", 1.0), waited("db", "gw1", 3.0), waited("db", "gw2", 0.01)]
    assert report.format_summary(events, verbosity=-1) == [
        "db  built by gw0 in 1.00 s; 2 waited, longest 3.00 s, total 3.01 s"
    ]
    assert report.format_summary(events, verbosity=-2) == report.format_summary(
        events, verbosity=-1
    )


def test_no_waits_means_no_wait_list() -> None:
    assert report.format_summary([built("db", "gw0", 1.0)], verbosity=2) == [
        "db  built by gw0 in 1.00 s"
    ]


def test_the_wait_list_stops_at_top_and_says_how_many_more_there_are() -> None:
    events = [built("db", "gw0", 1.0)] + [waited("db", f"gw{i}", float(i)) for i in range(1, 6)]
    lines = report.format_summary(events, top=2)
    assert wait_rows(lines) == ["    5.00s  gw5  db", "    4.00s  gw4  db"]
    assert lines[-1] == "(3 more waits not shown; use --prewarm-report 0 to show all)"


def test_top_zero_lists_every_wait() -> None:
    events = [built("db", "gw0", 1.0)] + [waited("db", f"gw{i}", float(i)) for i in range(1, 16)]
    lines = report.format_summary(events, top=0)
    assert len(wait_rows(lines)) == 15
    assert not any("not shown" in line for line in lines)


def test_the_default_top_is_ten() -> None:
    events = [built("db", "gw0", 1.0)] + [waited("db", f"gw{i}", float(i)) for i in range(1, 13)]
    lines = report.format_summary(events)
    assert len(wait_rows(lines)) == 10
    assert lines[-1] == "(2 more waits not shown; use --prewarm-report 0 to show all)"


def test_both_hints_appear_when_waits_are_cut_and_short_ones_hidden() -> None:
    events = [built("db", "gw0", 1.0)]
    events += [waited("db", f"gw{i}", float(i)) for i in range(1, 4)]
    events += [waited("db", f"gw{i}", 0.001) for i in range(4, 6)]
    lines = report.format_summary(events, top=1)
    assert wait_rows(lines) == ["    3.00s  gw3  db"]
    assert lines[-2:] == [
        "(2 more waits not shown; use --prewarm-report 0 to show all)",
        "(2 waits under 0.05 s hidden; use -vv to show them)",
    ]


def test_top_applies_to_short_waits_shown_under_very_verbose() -> None:
    events = [built("db", "gw0", 1.0)] + [waited("db", f"gw{i}", 0.001 * i) for i in range(1, 5)]
    lines = report.format_summary(events, top=3, verbosity=2)
    assert len(wait_rows(lines)) == 3
    assert lines[-1] == "(1 more waits not shown; use --prewarm-report 0 to show all)"


# -- grouping -----------------------------------------------------------------------------


def test_summarize_sorts_events_into_builds_failures_waits_and_reuses() -> None:
    events = [
        built("db", "gw0", 1.0),
        waited("db", "gw1", 0.5),
        TemplateEvent("db", "gw2", REUSED),  # found it published, no wait: a reuse
        TemplateEvent("db", "gw3", REUSED, wait_seconds=0.2),  # waited first: a wait
        failed_build("venv", "gw1", 0.1, "OSError: x"),
        failed_fast("venv", "gw0"),  # failed without building: a wait, even of 0 s
        TemplateEvent("venv", "gw2", TIMEOUT, wait_seconds=3.0),
    ]
    db, venv = report.summarize(events)
    assert (db.name, venv.name) == ("db", "venv")
    assert [e.worker for e in db.builds] == ["gw0"]
    assert [e.worker for e in db.waits] == ["gw1", "gw3"]
    assert [e.worker for e in db.reused] == ["gw2"]
    assert db.failures == []
    assert [e.worker for e in venv.failures] == ["gw1"]
    assert [e.worker for e in venv.waits] == ["gw0", "gw2"]
    assert db.wait_total == pytest.approx(0.7)
    assert venv.wait_longest == 3.0


# -- JSON ---------------------------------------------------------------------------------


def test_the_json_report_has_schema_version_one_and_carries_the_settings() -> None:
    settings = {"lock_dir": "/tmp/x", "timeout": 30.0, "eager": True}
    data = report.to_json([], settings)
    assert data == {
        "schema_version": 1,
        "settings": settings,
        "templates": [],
        "events": [],
        "teardowns": [],
    }


def test_the_json_report_lists_builds_waits_failures_and_recoveries_per_template() -> None:
    events = [
        TemplateEvent(
            "db",
            "gw1",
            BUILT,
            build_seconds=1.5,
            built_by="gw1",
            pid=11,
            recovered_from="gw0, pid 10: dead, no such process",
        ),
        TemplateEvent("db", "gw2", WAITED, wait_seconds=1.25, built_by="gw1", pid=12),
        TemplateEvent("db", "gw3", WAITED, wait_seconds=0.5, built_by="gw1", pid=13),
        failed_build("venv", "gw2", 0.25, "RuntimeError: boom"),
        TemplateEvent("venv", "gw1", FAILED, built_by="gw2", error="RuntimeError: boom", pid=11),
        TemplateEvent("cache", "gw0", REUSED, built_by="main", pid=10),
    ]
    data = report.to_json(events, {})
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    db, venv, cache = data["templates"]
    assert db == {
        "name": "db",
        "outcome": "built",
        "builds": [{"worker": "gw1", "pid": 11, "seconds": 1.5}],
        "failures": [],
        "waits": [
            {"worker": "gw2", "pid": 12, "seconds": 1.25, "outcome": "waited"},
            {"worker": "gw3", "pid": 13, "seconds": 0.5, "outcome": "waited"},
        ],
        "wait_total_seconds": 1.75,
        "wait_longest_seconds": 1.25,
        "recoveries": ["gw1 reclaimed the lock from gw0, pid 10: dead, no such process"],
        "notes": [],
    }
    assert venv["outcome"] == "failed"
    assert venv["failures"] == [
        {"worker": "gw2", "pid": 4100, "seconds": 0.25, "error": "RuntimeError: boom"}
    ]
    assert venv["waits"] == [{"worker": "gw1", "pid": 11, "seconds": 0.0, "outcome": "failed"}]
    assert cache["outcome"] == "reused"
    assert cache["builds"] == cache["waits"] == []
    assert [TemplateEvent.from_dict(e) for e in data["events"]] == events


def test_the_json_outcome_of_a_name_whose_requests_only_timed_out_is_timeout() -> None:
    # The terminal says "not built: timed out waiting for the lock"; the JSON must not
    # claim the template was reused from an earlier run.
    events = [TemplateEvent("db", "gw1", TIMEOUT, wait_seconds=30.0, error="timed out", pid=7)]
    (entry,) = report.to_json(events, {})["templates"]
    assert entry["outcome"] == "timeout"
    assert entry["builds"] == entry["failures"] == []
    assert entry["waits"] == [{"worker": "gw1", "pid": 7, "seconds": 30.0, "outcome": "timeout"}]


def test_a_name_found_published_by_an_earlier_run_is_reused_in_json() -> None:
    events = [
        TemplateEvent("db", "gw0", REUSED),
        TemplateEvent("db", "gw1", REUSED, wait_seconds=2),
    ]
    (entry,) = report.to_json(events, {})["templates"]
    assert entry["outcome"] == "reused"
    assert [w["outcome"] for w in entry["waits"]] == ["reused"]


def test_a_worker_that_waited_for_a_killed_builder_and_took_over_counts_as_waiting() -> None:
    dead = "gw0, pid 4100: dead, no such process"
    events = [
        built("db", "gw1", 1.0, recovered_from=dead, wait_seconds=3.5),
        waited("db", "gw2", 4.0, built_by="gw1"),
    ]
    lines = report.format_summary(events, verbosity=-1)
    assert lines[0] == "db  built by gw1 in 1.00 s; 2 waited, longest 4.00 s, total 7.50 s"
