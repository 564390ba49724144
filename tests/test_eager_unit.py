"""EagerBuilds driven directly: the walk's order, its failures, and the bounded wait at the end.

A real TemplateStore in a temporary lock dir builds in the background thread; the lines
the walk writes to the terminal (console.emit) go to a file the test reads.
"""

from __future__ import annotations

import _thread
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from pytest_prewarm import console, eager
from pytest_prewarm.eager import EagerBuilds, worker_index
from pytest_prewarm.request import Request, TemplateStore


class Console:
    """console.emit's lines, written to a file instead of the real stderr."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []


@pytest.fixture
def terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:
    path = tmp_path / "terminal.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    monkeypatch.setattr(console, "_fd", fd)
    try:
        yield Console(path)
    finally:
        os.close(fd)


class Blocked:
    """A builder that says it started, then waits (bounded) until the test lets it go."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, path: Path) -> str:
        self.started.set()
        assert self.release.wait(60), "the test never released the build"
        self.finished.set()
        return "built"


@pytest.fixture
def blocked() -> Iterator[Blocked]:
    build = Blocked()
    try:
        yield build
    finally:
        build.release.set()  # never leave a builder thread waiting after the test


def store(tmp_path: Path, worker: str = "gw0") -> TemplateStore:
    return TemplateStore(tmp_path / "lock-dir", run_id="run", worker=worker)


def started(builds: EagerBuilds, build: Blocked) -> EagerBuilds:
    builds.start()
    assert build.started.wait(30), "the eager build never started"
    return builds


@pytest.mark.parametrize(
    ("worker", "index"), [("gw0", 0), ("gw3", 3), ("gw12", 12), ("master", 0), ("gwx", 0)]
)
def test_each_worker_starts_its_walk_at_its_own_number(worker, index):
    assert worker_index(worker) == index


def test_worker_k_starts_at_template_k_modulo_their_count(tmp_path):
    requests = [Request(name, str, None, 10.0) for name in ("a", "b", "c")]

    walk = EagerBuilds(store(tmp_path, "gw4"), requests, workers=5)

    assert [r.name for r in walk.requests] == ["b", "c", "a"]


@pytest.mark.parametrize(("worker", "first"), [("gw0", "t0"), ("gw1", "t2"), ("gw3", "t6")])
def test_with_more_templates_than_workers_each_worker_starts_at_its_own_share(
    tmp_path, worker, first
):
    requests = [Request(f"t{n}", str, None, 10.0) for n in range(8)]

    walk = EagerBuilds(store(tmp_path, worker), requests, workers=4)

    assert walk.requests[0].name == first
    assert sorted(r.name for r in walk.requests) == sorted(r.name for r in requests)
    assert len(walk.threads) == 2  # its share of 8 templates on 4 workers, side by side


@pytest.mark.parametrize(
    ("templates", "workers", "threads", "expected"),
    [
        (64, 4, None, 16),  # auto: the share
        (1000, 4, None, eager.MAX_AUTO_THREADS),  # auto: capped
        (3, 4, None, 1),
        (5, 1, 2, 2),  # as asked
        (2, 1, 8, 2),  # never more threads than templates
        (7, 2, 1, 1),  # 1: one build at a time, as before
    ],
)
def test_the_number_of_eager_threads(templates, workers, threads, expected):
    assert eager.thread_count(templates, workers, threads) == expected


def test_the_help_text_names_the_cap_the_walk_uses():
    from pytest_prewarm import config

    assert config.MAX_AUTO_EAGER_THREADS == eager.MAX_AUTO_THREADS


def test_a_process_builds_its_share_side_by_side(tmp_path):
    # Four builders that each wait until all four have started: only threads that run
    # together get through (bounded: a walk of one thread would time out here).
    everyone = threading.Barrier(4, timeout=30)
    names = [f"t{n}" for n in range(4)]

    def build(path: Path) -> str:
        everyone.wait()
        return threading.current_thread().name

    walk = EagerBuilds(
        store(tmp_path), [Request(n, build, None, 30.0) for n in names], threads=4
    ).start()
    for thread in walk.threads:
        thread.join(60)

    assert not walk.alive()
    values = {walk.store.get(Request(n, build, None, 30.0)).value for n in names}
    assert values == {"prewarm-eager", "prewarm-eager-2", "prewarm-eager-3", "prewarm-eager-4"}
    assert walk.building == []


def test_a_request_that_fails_is_reported_and_the_walk_goes_on(tmp_path, terminal):
    built: list[str] = []

    def build(path: Path) -> str:
        built.append(path.name)
        return "ok"

    requests = [Request("", build, None, 10.0), Request("good", build, None, 10.0)]
    walk = EagerBuilds(store(tmp_path), requests, threads=1).start()
    walk.threads[0].join(30)

    assert not walk.alive()
    assert len(built) == 1
    assert walk.building == []
    (line,) = terminal.lines()
    assert line.startswith("[prewarm] eager build of '' in gw0 failed: ")
    assert "template name is empty" in line


def test_finishing_after_the_walk_ended_waits_for_nothing_and_says_nothing(tmp_path, terminal):
    walk = EagerBuilds(store(tmp_path), [Request("db", lambda path: 1, None, 10.0)]).start()
    walk.threads[0].join(30)

    walk.finish(0.0, interrupted=False)

    assert terminal.lines() == []


def test_after_ctrl_c_a_build_in_progress_is_abandoned_at_once(tmp_path, terminal, blocked):
    walk = started(EagerBuilds(store(tmp_path), [Request("db", blocked, None, 10.0)]), blocked)

    walk.finish(60.0, interrupted=True)

    assert walk.alive()  # not waited for: a daemon thread, gone with the process
    assert not blocked.finished.is_set()
    assert terminal.lines() == [
        "[prewarm] gw0 abandoning its eager build of 'db' "
        "(the run was interrupted; the next holder builds it)"
    ]


def test_the_wait_for_a_build_in_progress_gives_up_at_the_timeout(tmp_path, terminal, blocked):
    walk = started(EagerBuilds(store(tmp_path), [Request("db", blocked, None, 10.0)]), blocked)

    walk.finish(0.3, interrupted=False)

    assert walk.alive()
    assert terminal.lines() == [
        "[prewarm] gw0 gave up waiting for its eager build of 'db' (0.3 s, the timeout, passed)"
    ]


def test_a_long_wait_says_what_it_waits_for_until_the_build_ends(
    tmp_path, terminal, blocked, monkeypatch
):
    monkeypatch.setattr(eager, "NOTICE_EVERY", 0.05)
    walk = started(EagerBuilds(store(tmp_path), [Request("db", blocked, None, 10.0)]), blocked)

    notices: list[str] = []

    def release_after_two_notices() -> None:
        wait_until(lambda: len(terminal.lines()) >= 2, 30, what="two notices")
        notices.extend(terminal.lines()[:2])
        blocked.release.set()

    releaser = threading.Thread(target=release_after_two_notices, daemon=True)
    releaser.start()
    walk.finish(60.0, interrupted=False)
    releaser.join(30)

    assert not walk.alive()
    assert len(notices) == 2
    # Nothing is said once the build has ended (it once named the build "None").
    assert all("None" not in line for line in terminal.lines())
    for line in notices:
        assert line.startswith("[prewarm] gw0 is waiting for its eager build of 'db' (")
        assert line.endswith(" s of at most 60 s; Ctrl-C abandons it)")
    assert walk.store.get(Request("db", blocked, None, 10.0)).value == "built"


def test_ctrl_c_during_the_wait_abandons_the_build(tmp_path, terminal, blocked, monkeypatch):
    monkeypatch.setattr(eager, "NOTICE_EVERY", 0.05)
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a Ctrl-C reaches the main thread only")
    walk = started(EagerBuilds(store(tmp_path), [Request("db", blocked, None, 10.0)]), blocked)

    def ctrl_c_after_a_notice() -> None:
        wait_until(terminal.lines, 30, what="a notice")
        _thread.interrupt_main()  # as a SIGINT would, in the main thread

    interrupter = threading.Thread(target=ctrl_c_after_a_notice, daemon=True)
    interrupter.start()
    walk.finish(60.0, interrupted=False)
    interrupter.join(30)

    # Not waited for (the thread is a daemon, gone with the process). Not thread.is_alive():
    # on 3.11 a KeyboardInterrupt inside Thread.join() marks the joined thread stopped.
    assert not blocked.finished.is_set()
    assert terminal.lines()[-1] == (
        "[prewarm] gw0 abandoning its eager build of 'db' (interrupted while waiting for it)"
    )
