"""The pytest11 entry point: hooks and fixtures, kept thin.

The work happens in the core: request.py (one template request, start to end), events.py
(collecting and merging what each process did), lockdir.py (the lock dir) and report.py
(the summary). This module translates between them and pytest and xdist.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import config as config_mod
from . import console, eager, keys, lockdir, marker, report
from .config import Settings
from .events import EventLog
from .exceptions import LockDirError, PrewarmUsageError
from .kinds import LockMode
from .locking import Holder
from .names import canonical_key
from .registry import REGISTRY
from .request import (
    Builder,
    Configure,
    Request,
    Teardown,
    Template,
    TemplateFactory,
    TemplateStore,
    make_request,
)

WORKERINPUT_LOCK_DIR = "prewarm_lock_dir"
WORKERINPUT_RUN_ID = "prewarm_run_id"
WORKERINPUT_LOCK_MODE = "prewarm_lock_mode"
WORKEROUTPUT_EVENTS = "prewarm_events"
WORKERINPUT_CONTROLLER_PID = "prewarm_controller_pid"


@dataclass
class State:
    """What the plugin keeps per pytest process (controller or worker)."""

    settings: Settings
    run_id: str
    worker: str
    owns_lock_dir: bool
    store: TemplateStore
    log: EventLog
    lock_mode: LockMode
    lock_mode_why: str
    eager_builds: eager.EagerBuilds | None = None
    teardowns: list[Any] | None = None  # teardown.Result of each teardown this run ran

    @property
    def lock_dir(self) -> Path:
        return self.store.lock_dir

    def request_for(
        self,
        name: str,
        build: Builder | None = None,
        key: Any = None,
        timeout: float | None = None,
        configure: Configure | None = None,
        requires: Sequence[Template | str] = (),
        teardown: Teardown | None = None,
    ) -> Request:
        return make_request(
            name,
            build,
            key,
            timeout,
            registry=REGISTRY,
            default_timeout=self.settings.timeout.value,
            default_source=self.settings.timeout.source,
            configure=configure,
            requires=requires,
            teardown=teardown,
        )


STATE_KEY = pytest.StashKey[State]()
REGISTRY_SNAPSHOT_KEY = pytest.StashKey[dict[str, Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    config_mod.addoption(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Conftests register builders in a process-wide registry. Remember what it held before
    # this session's conftests were imported and restore it at the end, so sequential
    # in-process sessions (pytester's inline runs) don't see each other's builders.
    early_config.stash[REGISTRY_SNAPSHOT_KEY] = REGISTRY.snapshot()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _controller_lock_dir(settings: Settings, run_id: str) -> tuple[Path, bool]:
    """(lock dir, whether this run owns it) for a controller or a run without xdist."""
    if settings.lock_dir.value is None:
        return lockdir.create_run_dir(run_id, "main"), True
    return lockdir.prepare(settings.lock_dir.value, settings.lock_dir.source), False


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
        lock_mode = LockMode(workerinput[WORKERINPUT_LOCK_MODE])
        mode_why = "chosen by the controller"
    else:
        worker = "main"
        run_id = uuid.uuid4().hex
        try:
            lock_dir, owns = _controller_lock_dir(settings, run_id)
            lock_mode, mode_why = lockdir.choose_lock_mode(lock_dir, settings.lock_mode.value)
            lockdir.pin_mode(lock_dir, lock_mode, mode_why)
        except LockDirError as exc:
            raise pytest.UsageError(f"prewarm: {exc}") from exc
    try:
        store = TemplateStore(
            lock_dir,
            run_id=run_id,
            worker=worker,
            rebuild=settings.rebuild,
            notice_every=settings.notice_after.value or float("inf"),
            lock_mode=lock_mode,
            stale_after=settings.stale_after.value,
            heartbeat=settings.heartbeat,
            supplied=settings.supplied,
        )
    except LockDirError as exc:  # a subdirectory that is a symlink, another user's...
        raise pytest.UsageError(f"prewarm: {exc}") from exc
    if _is_worker(config):
        store.controller_pid = int(workerinput.get(WORKERINPUT_CONTROLLER_PID) or os.getppid())
    store.teardown_timeout = settings.teardown_timeout.value
    log = EventLog(store.layout, run_id, worker)
    store.on_event = log.record
    store.on_notice = _notice_writer(worker)
    config.stash[STATE_KEY] = State(settings, run_id, worker, owns, store, log, lock_mode, mode_why)
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
        state.log.flush()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is not None and state.eager_builds is not None:
        # Let a background build finish (or fail) rather than abandon it half-way, unless
        # the run was interrupted: then nothing is waited for.
        state.eager_builds.finish(
            state.settings.timeout.value,
            interrupted=exitstatus == pytest.ExitCode.INTERRUPTED,
        )
    _flush(config)
    if state is not None and _is_worker(config):
        config.workeroutput[WORKEROUTPUT_EVENTS] = [  # type: ignore[attr-defined]
            e.to_dict() for e in state.log.events
        ]


@pytest.hookimpl(wrapper=True, trylast=True, specname="pytest_sessionfinish")
def pytest_sessionfinish_teardowns(session: pytest.Session) -> Any:
    # Innermost wrapper: its second half runs after every plain sessionfinish hook, so
    # after xdist's, which brings the workers down; and before the terminal summary,
    # which an outer wrapper (the terminal reporter's) writes after it.
    result = yield
    state = session.config.stash.get(STATE_KEY, None)
    if state is None or _is_worker(session.config):
        return result
    if not state.store.layout.services_root.is_dir():
        return result  # no template with a teardown was built: nothing to load or do
    from . import teardown

    state.teardowns = teardown.finish(
        state.store.layout,
        state.run_id,
        runner=state.store.services().controller(),
        timeout=state.settings.teardown_timeout.value,
    )
    if any(r.outcome != teardown.OK for r in state.teardowns) and session.exitstatus in (
        pytest.ExitCode.OK,
        pytest.ExitCode.NO_TESTS_COLLECTED,
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # as a failing fixture teardown
    return result


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    state = config.stash.get(STATE_KEY, None)
    if state is None or _is_worker(config):
        return
    events = state.log.merged()
    if state.settings.keys_path is not None and not config.option.collectonly:
        _write(state.settings.keys_path, keys.from_events(events))
    if state.settings.json_path is not None:
        data = report.to_json(
            events,
            state.settings.as_dict(lock_dir=state.lock_dir, lock_mode=state.lock_mode),
            teardowns=[r.to_dict() for r in state.teardowns or ()],
        )
        _write(state.settings.json_path, json.dumps(data, indent=2) + "\n")
    lines = report.format_summary(
        events,
        top=state.settings.report_top,
        verbosity=config.get_verbosity(),
        teardowns=[r.to_dict() for r in state.teardowns or ()],
    )
    if not lines:
        return
    terminalreporter.write_sep("=", "prewarm summary")
    for line in lines:
        terminalreporter.write_line(line)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


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
        shutil.rmtree(state.store.layout.events_dir(state.run_id), ignore_errors=True)
        state.store.forget_run()


class XdistHooks:
    """Hooks that exist only when pytest-xdist is loaded (it must never be imported here)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        state = self.config.stash[STATE_KEY]
        node.workerinput[WORKERINPUT_LOCK_DIR] = str(state.lock_dir)
        node.workerinput[WORKERINPUT_RUN_ID] = state.run_id
        node.workerinput[WORKERINPUT_LOCK_MODE] = str(state.lock_mode)
        node.workerinput[WORKERINPUT_CONTROLLER_PID] = os.getpid()

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        state = self.config.stash[STATE_KEY]
        output = getattr(node, "workeroutput", None) or {}
        received = output.get(WORKEROUTPUT_EVENTS)
        if received is None:
            return  # crashed: its events are read from the lock dir at summary time
        state.log.add_reported(str(node.workerinput["workerid"]), received)


@pytest.fixture(scope="session")
def prewarmed_template(request: pytest.FixtureRequest) -> TemplateFactory:
    """Get a template built once per test run across all xdist workers.

    ``prewarmed_template(name, build=None, *, key=None, timeout=None, configure=None,
    requires=())`` returns a
    :class:`pytest_prewarm.Template` (``os.PathLike``; ``.path``, ``.name``, ``.key``,
    ``.value``). The first process to take the template's lock calls ``build(path)`` on an
    empty directory; every other process waits, then gets the same published directory.
    Without ``build``, the builder registered with ``@pytest_prewarm.template(name)`` is used.
    ``teardown(path, value)``, a module-level function, stops what the build started,
    exactly once after the last test of the run that could use it (docs/usage.md).
    Annotate it as :class:`pytest_prewarm.TemplateFactory`.
    """
    state = request.config.stash[STATE_KEY]

    def get(
        name: str,
        build: Builder | None = None,
        *,
        key: Any = None,
        timeout: float | None = None,
        configure: Configure | None = None,
        requires: Sequence[Template | str] = (),
        teardown: Teardown | None = None,
    ) -> Template:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        request = state.request_for(
            name, build, key, timeout, configure=configure, requires=requires, teardown=teardown
        )
        return state.store.get(request)

    return get


ITEM_TEMPLATES_KEY = pytest.StashKey[dict[str, Template]]()


@pytest.fixture
def prewarmed(request: pytest.FixtureRequest) -> dict[str, Template]:
    """The templates named by this test's ``@pytest.mark.prewarm(...)`` markers, by name.

    They are ready before the test's setup; ``prewarmed["db"].path`` is the directory.
    """
    return dict(request.node.stash.get(ITEM_TEMPLATES_KEY, {}))


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
    if state is not None and state.settings.keys_path and session.config.option.collectonly:
        _write_selection_keys(state, session.items)
    if (
        state is None
        or not state.settings.eager
        or not session.items
        or session.config.option.collectonly
    ):
        return
    names = marker.needed_by(session.items)
    if names:
        requests = [state.request_for(n) for n in names]
        state.eager_builds = eager.EagerBuilds(state.store, requests).start()


def _write_selection_keys(state: State, items: list[pytest.Item]) -> None:
    """``--collect-only --prewarm-keys``: the keys of the marked templates, nothing built."""
    requests = [state.request_for(name) for name in marker.needed_by(items)]
    canonical = {}
    pending = list(requests)
    while pending:
        request = pending.pop()
        canonical[request.name] = canonical_key(request.key, name=request.name)
        pending += [r for r in request.requires if isinstance(r, Request)]
    assert state.settings.keys_path is not None
    _write(state.settings.keys_path, keys.from_requests(requests, canonical))


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
