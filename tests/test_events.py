"""EventLog without a pytest run: collected, appended to the lock dir, merged on the controller."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_prewarm.events import EventLog, TemplateEvent, parse_lines
from pytest_prewarm.kinds import Outcome
from pytest_prewarm.layout import Layout


def event(outcome: Outcome, worker: str = "gw0", **kw: object) -> TemplateEvent:
    return TemplateEvent("db", worker, outcome, **kw)  # type: ignore[arg-type]


def log(lock_dir: Path, worker: str = "gw0", run_id: str = "run-1") -> EventLog:
    layout = Layout(lock_dir)
    layout.ensure()
    return EventLog(layout, run_id, worker)


def test_a_build_is_written_at_once_and_a_wait_only_when_flushed(tmp_path: Path) -> None:
    one = log(tmp_path)
    path = one.layout.events_file("run-1", "gw0", os.getpid())

    one.record(event(Outcome.WAITED, wait_seconds=0.5))
    assert not path.exists()  # nothing on the wake path
    one.record(event(Outcome.BUILT, build_seconds=1.0))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == ["waited", "built"]

    one.record(event(Outcome.REUSED))
    one.flush()
    one.flush()  # nothing left: nothing written twice
    assert len(path.read_text().splitlines()) == 3
    assert [e.outcome for e in one.events] == ["waited", "built", "reused"]


def test_to_dict_carries_builtin_types_only(tmp_path: Path) -> None:
    data = event(Outcome.FAILED, error="E: x").to_dict()
    assert type(data["outcome"]) is str
    assert TemplateEvent.from_dict(data) == event(Outcome.FAILED, error="E: x")
    assert TemplateEvent.from_dict({**data, "unknown": 1}) == event(Outcome.FAILED, error="E: x")


def test_the_controller_merges_reported_workers_and_reads_crashed_ones_from_disk(
    tmp_path: Path,
) -> None:
    controller = log(tmp_path, "main")
    controller.record(event(Outcome.REUSED, "main"))
    reported = log(tmp_path, "gw0")
    reported.record(event(Outcome.BUILT, "gw0", build_seconds=1.0))
    crashed = log(tmp_path, "gw1")
    crashed.record(event(Outcome.FAILED, "gw1", build_seconds=0.1, error="E: boom"))

    controller.add_reported("gw0", [e.to_dict() for e in reported.events])
    merged = controller.merged()

    # gw0 is counted once (reported, its file ignored); gw1 crashed: read from its file.
    assert [(e.worker, e.outcome) for e in merged] == [
        ("main", "reused"),
        ("gw0", "built"),
        ("gw1", "failed"),
    ]


def test_a_torn_or_foreign_events_file_never_breaks_the_merge(tmp_path: Path) -> None:
    controller = log(tmp_path, "main")
    directory = controller.layout.events_dir("run-1")
    directory.mkdir()
    good = json.dumps(event(Outcome.WAITED, "gw2", wait_seconds=2.0).to_dict())
    (directory / "gw2-1.jsonl").write_text(good + "\n" + good[:20] + '\n[1, 2]\n{"x": 1}\n')
    os.mkfifo(directory / "gw3-2.jsonl")  # never opened blocking
    (directory / "gw4-3.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")

    merged = controller.merged()

    assert [(e.worker, e.outcome) for e in merged] == [("gw2", "waited")]


def test_parse_lines_skips_what_is_not_an_event() -> None:
    good = json.dumps(event(Outcome.TIMEOUT, wait_seconds=3.0).to_dict())
    assert (
        parse_lines(f"{good}\n\nnot json\n{{}}\n{good}")
        == [event(Outcome.TIMEOUT, wait_seconds=3.0)] * 2
    )
