"""The pytest11 entry point: options, the ``prewarmed_template`` fixture, xdist wiring.

Hooks stay thin; the work happens in store.py (build once), lock.py (waiting) and
report.py (the summary).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import config as config_mod
from . import console, lockdir, marker, report
from .config import Settings
from .events import BUILT, FAILED, TemplateEvent
from .exceptions import PrewarmUsageError
from .lock import Holder
from .names import file_stem
from .registry import REGISTRY
from .store import Request, Template, TemplateStore, check_timeout

WORKERINPUT_LOCK_DIR = "prewarm_lock_dir"
WORKERINPUT_RUN_ID = "prewarm_run_id"
WORKERINPUT_LOCK_MODE = "prewarm_lock_mode"
WORKEROUTPUT_EVENTS = "prewarm_events"


@dataclass
class State:
    settings: Settings
    lock_dir: Path
    run_id: str
    worker: str
    owns_lock_dir: bool
    store: TemplateStore
    lock_mode: str
    lock_mode_why: str
    # Controller only: events received from workers, and which workers reported.
    worker_events: list[TemplateEvent] = field(default_factory=list)
    reported_workers: set[str] = field(default_factory=set)
    eager_thread: threading.Thread | None = None
    unflushed: list[TemplateEvent] = field(default_factory=list)
    flush_lock: threading.Lock = field(default_factory=threading.Lock)

    def request_for(
        self,
        name: str,
        build: Callable[[Path], Any] | None = None,
        key: Any = None,
        timeout: float | None = None,
    ) -> Request:
        registered = REGISTRY.get(name) if isinstance(name, str) else None
        if build is None:
            if registered is None:
                known = ", ".join(REGISTRY.names()) or "none"
                raise PrewarmUsageError(
                    f"template {name!r} has no builder: pass build=..., or register one with "
                    f"@pytest_prewarm.template({name!r}) in a conftest.py (registered: {known})"
                )
            build = registered.build
            if key is None:
                key = registered.key
        if not callable(build):
            raise PrewarmUsageError(f"build for template {name!r} is not callable: {build!r}")
        if timeout is None:
            seconds, source = self.settings.timeout.value, self.settings.timeout.source
        else:
            seconds, source = check_timeout(timeout, name=str(name)), "timeout= in the call"
        return Request(name, build, key, seconds, source)

    @property
    def events_dir(self) -> Path:
        return self.lock_dir / "events" / file_stem(self.run_id)

    def record_event(self, event: TemplateEvent) -> None:
        # A waiter's event is kept in memory until its test ends: writing it here would
        # lengthen every wake-up. A build's event is written at once (after the lock is
        # released), so that a builder killed in the same test still leaves it behind.
        self.unflushed.append(event)
        if event.outcome in (BUILT, FAILED):
            self.flush_events()

    def flush_events(self) -> None:
        """Append unflushed events to this process's file in the lock dir."""
        with self.flush_lock:  # the eager thread and the main thread both flush
            if not self.unflushed:
                return
            events, self.unflushed = self.unflushed, []
            self._append(events)

    def _append(self, events: list[TemplateEvent]) -> None:
        self.events_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = "".join(json.dumps(e.to_dict()) + "\n" for e in events)
        path = self.events_dir / f"{file_stem(self.worker)}-{os.getpid()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)

    def all_events(self) -> list[TemplateEvent]:
        """Own events, workers' reported events, and crashed workers' events from disk."""
        events = list(self.store.events) + self.worker_events
        try:
            files = sorted(self.events_dir.glob("*.jsonl"))
        except OSError:
            files = []
        for path in files:
            for event in _read_events(path):
                if event.worker != self.worker and event.worker not in self.reported_workers:
                    events.append(event)
        return events


STATE_KEY = pytest.StashKey[State]()


def pytest_addoption(parser: pytest.Parser) -> None:
    config_mod.addoption(parser)


REGISTRY_SNAPSHOT_KEY = pytest.StashKey[dict[str, Any]]()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Conftests register builders in a process-wide registry. Remember what it held before
    # this session's conftests were imported and restore it at the end, so sequential
    # in-process sessions (pytester's inline runs) don't see each other's builders.
    early_config.stash[REGISTRY_SNAPSHOT_KEY] = REGISTRY.snapshot()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    settings = Settings.from_config(config)
    owns = False
    if _is_worker(config):
        workerinput: dict[str, Any] = config.workerinput  # type: ignore[attr-defined]
        worker = str(workerinput["workerid"])
        run_id = str(workerinput.get(WORKERINPUT_RUN_ID) or workerinput["testrunuid"])
        lock_dir = Path(workerinput[WORKERINPUT_LOCK_DIR])
        # The controller decides the mode once: workers that disagreed would not exclude.
        lock_mode, mode_why = workerinput[WORKERINPUT_LOCK_MODE], "chosen by the controller"
    else:
        worker = "main"
        run_id = uuid.uuid4().hex
        try:
            if settings.lock_dir.value is None:
                lock_dir = lockdir.create_run_dir(run_id, worker)
                owns = True
            else:
                lock_dir = lockdir.prepare(settings.lock_dir.value, settings.lock_dir.source)
        except lockdir.LockDirError as exc:
            raise pytest.UsageError(f"prewarm: {exc}") from exc
        lock_mode, mode_why = lockdir.choose_lock_mode(lock_dir, settings.lock_mode.value)
        try:
            lockdir.pin_mode(lock_dir, lock_mode, mode_why)
        except lockdir.LockDirError as exc:
            raise pytest.UsageError(f"prewarm: {exc}") from exc
    store = TemplateStore(
        lock_dir,
        run_id=run_id,
        worker=worker,
        rebuild=settings.rebuild,
        notice_every=settings.notice_after.value or float("inf"),
        lock_mode=lock_mode,
        stale_after=settings.stale_after.value,
        heartbeat=settings.heartbeat,
    )
    state = State(settings, lock_dir, run_id, worker, owns, store, lock_mode, mode_why)
    store.on_event = state.record_event
    store.on_notice = _notice_writer(worker)
    config.stash[STATE_KEY] = state
    config.addinivalue_line("markers", marker.MARKER_LINE)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config), "prewarm-xdist-hooks")


def _notice_writer(worker: str) -> Callable[[str, float, Holder], None]:
    def notice(template: str, waited: float, holder: Holder) -> None:
        console.emit(
            f"[prewarm] {worker} has waited {waited:.1f} s for template {template!r}, "
            f"{holder.describe()}"
        )

    return notice


def _read_events(path: Path) -> list[TemplateEvent]:
    events: list[TemplateEvent] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return events
    for line in text.splitlines():
        try:
            data = json.loads(line)
            events.append(TemplateEvent.from_dict(data))
        except (ValueError, TypeError):
            continue  # a line torn by a kill mid-write
    return events


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return None
    s = state.settings
    where = "per-run default" if s.lock_dir.value is None else s.lock_dir.source
    return (
        f"prewarm: lock dir {state.lock_dir} ({where}), lock mode {state.lock_mode} "
        f"({state.lock_mode_why}), timeout {s.timeout.value:g} s, "
        f"stale window {s.stale_after.value:g} s"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    try:
        return (yield)
    finally:
        _flush(item.config)


def _flush(config: pytest.Config | None) -> None:
    state = None if config is None else config.stash.get(STATE_KEY, None)
    if state is not None:
        state.flush_events()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is not None and state.eager_thread is not None:
        # Let a background build finish (or fail) rather than abandon it half-way.
        state.eager_thread.join(state.settings.timeout.value)
    _flush(config)
    if state is not None and _is_worker(config):
        config.workeroutput[WORKEROUTPUT_EVENTS] = [  # type: ignore[attr-defined]
            e.to_dict() for e in state.store.events
        ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    state = config.stash.get(STATE_KEY, None)
    if state is None or _is_worker(config):
        return
    events = state.all_events()
    if state.settings.json_path is not None:
        data = report.to_json(
            events, state.settings.as_dict(lock_dir=state.lock_dir, lock_mode=state.lock_mode)
        )
        path: Path = state.settings.json_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    lines = report.format_summary(
        events, top=state.settings.report_top, verbosity=config.get_verbosity()
    )
    if not lines:
        return
    terminalreporter.write_sep("=", "prewarm summary")
    for line in lines:
        terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    snapshot = config.stash.get(REGISTRY_SNAPSHOT_KEY, None)
    if snapshot is not None:
        REGISTRY.restore(snapshot)
    state = config.stash.get(STATE_KEY, None)
    if state is None or _is_worker(config):
        return
    if state.owns_lock_dir:
        lockdir.remove_run_dir(state.lock_dir)
    else:
        # A shared lock dir keeps templates across runs, but not per-run bookkeeping.
        shutil.rmtree(state.events_dir, ignore_errors=True)
        state.store.forget_run()


class XdistHooks:
    """Hooks that exist only when pytest-xdist is loaded (it must never be imported here)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        state = self.config.stash[STATE_KEY]
        node.workerinput[WORKERINPUT_LOCK_DIR] = str(state.lock_dir)
        node.workerinput[WORKERINPUT_RUN_ID] = state.run_id
        node.workerinput[WORKERINPUT_LOCK_MODE] = state.lock_mode

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        state = self.config.stash[STATE_KEY]
        output = getattr(node, "workeroutput", None) or {}
        received = output.get(WORKEROUTPUT_EVENTS)
        if received is None:
            return  # crashed: its events are read from the lock dir at summary time
        state.reported_workers.add(str(node.workerinput["workerid"]))
        state.worker_events.extend(TemplateEvent.from_dict(d) for d in received)


TemplateFactory = Callable[..., Template]


@pytest.fixture(scope="session")
def prewarmed_template(request: pytest.FixtureRequest) -> TemplateFactory:
    """Get a template built once per test run across all xdist workers.

    ``prewarmed_template(name, build=None, *, key=None, timeout=None)`` returns a
    :class:`pytest_prewarm.Template` (``os.PathLike``; ``.path``, ``.name``, ``.key``,
    ``.value``). The first process to take the template's lock calls ``build(path)`` on an
    empty directory; every other process waits, then gets the same published directory.
    Without ``build``, the builder registered with ``@pytest_prewarm.template(name)`` is used.
    """
    state = request.config.stash[STATE_KEY]

    def get(
        name: str,
        build: Callable[[Path], Any] | None = None,
        *,
        key: Any = None,
        timeout: float | None = None,
    ) -> Template:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        return state.store.get(state.request_for(name, build, key, timeout))

    return get


@pytest.fixture
def prewarmed(request: pytest.FixtureRequest) -> dict[str, Template]:
    """The templates named by this test's ``@pytest.mark.prewarm(...)`` markers, by name.

    They are ready before the test's setup; ``prewarmed["db"].path`` is the directory.
    """
    return dict(request.node.stash.get(ITEM_TEMPLATES_KEY, {}))


ITEM_TEMPLATES_KEY = pytest.StashKey[dict[str, Template]]()


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    result = yield
    # Validate markers while collecting, so a typo fails as a collection error that names
    # the test, on every worker alike, instead of an error in each test's setup.
    items = result if isinstance(result, list) else [result]
    for item in items:
        if isinstance(item, pytest.Item):
            try:
                marker.marker_names(item)
            except PrewarmUsageError as exc:
                raise collector.CollectError(str(exc)) from None
    return result


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if (
        state is None
        or not state.settings.eager
        or not session.items
        or session.config.option.collectonly
    ):
        return
    names = marker.needed_by(session.items)
    if not names:
        return
    requests = [state.request_for(name) for name in names]
    # Start each worker at a different template so that K workers and K templates take
    # one each on the first try instead of all contending for the first.
    offset = _worker_index(state.worker) % len(requests)
    ordered = requests[offset:] + requests[:offset]
    thread = threading.Thread(
        target=_prewarm, args=(state, ordered), name="prewarm-eager", daemon=True
    )
    state.eager_thread = thread
    thread.start()


def _prewarm(state: State, requests: list[Request]) -> None:
    for req in requests:
        try:
            state.store.build_if_free(req)
        except Exception as exc:
            console.emit(f"[prewarm] eager build of {req.name!r} in {state.worker} failed: {exc}")


def _worker_index(worker: str) -> int:
    digits = worker.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    __tracebackhide__ = True  # users need the builder's frames, not ours
    names = marker.marker_names(item)
    if not names:
        return
    state = item.config.stash[STATE_KEY]
    item.stash[ITEM_TEMPLATES_KEY] = {
        name: state.store.get(state.request_for(name)) for name in names
    }
