"""The pytest11 entry point: hooks and fixtures, kept thin and cheap to load.

pytest loads this module in every process of every run of an environment that has the
plugin installed, most of which never ask for a template. So it imports pytest and
nothing of the core: start-up resolves the settings (bad values are still usage errors
at once) and decides the run id and the lock dir's path, and state.py makes the rest
on the first template request. The work happens in the core: request.py (one template
request), events.py (what each process did), lockdir.py (the lock dir) and report.py
(the summary).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# The one core module loaded at import: it keeps a copy of fd 2, which must be taken
# before pytest's capture replaces it, for live lines from captured workers (console.py).
from . import console  # noqa: F401

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .config import Settings
    from .events import TemplateEvent
    from .request import Builder, Configure, Teardown, Template, TemplateFactory
    from .state import State

WORKERINPUT_LOCK_DIR = "prewarm_lock_dir"
WORKERINPUT_RUN_ID = "prewarm_run_id"
WORKERINPUT_CONTROLLER_PID = "prewarm_controller_pid"
WORKEROUTPUT_EVENTS = "prewarm_events"
WORKEROUTPUT_LOCK_MODE = "prewarm_lock_mode"

PINNED = "pinned in the lock dir"  # in the reason of a mode found pinned (lockdir.settle_mode)
MARKER = "prewarm"
FIXTURE_NAME = "prewarmed_template"
MARKER_LINE = (
    "prewarm(*names): the test needs these templates, registered with "
    "@pytest_prewarm.template(name). They are ready before the test's setup (built early, "
    "in parallel across workers) and reachable through the `prewarmed` fixture or "
    "prewarmed_template(name)."
)

STATE_KEY = pytest.StashKey["State"]()
REGISTRY_SNAPSHOT_KEY = pytest.StashKey[dict[str, Any]]()
_REGISTRY_MODULE = "pytest_prewarm.registry"
_MARKER_MODULE = "pytest_prewarm.marker"


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    _load_without_assertion_rewriting(pluginmanager)  # before the first core import
    from .config import addoption

    addoption(parser)


def _load_without_assertion_rewriting(pluginmanager: pytest.PytestPluginManager) -> None:
    """Let Python's own importer load the rest of the package, not pytest's assertion rewriter.

    pytest marks every module of a pytest11 plugin's distribution for assertion rewriting.
    Our asserts are invariants, not test assertions, so rewriting them buys nothing, and
    its importer made the first template request's imports twice as slow (20-30 ms against
    10-15 ms of CPU, measured in one process). Where it cannot write its own bytecode
    (PYTHONDONTWRITEBYTECODE, a read-only site-packages) it parses and compiles each module
    again in every process. pytest has no public way to unmark a package: the set is
    private, so a pytest without it simply goes on rewriting.
    """
    marked = getattr(getattr(pluginmanager, "rewrite_hook", None), "_must_rewrite", None)
    if isinstance(marked, set):
        marked.discard(__package__)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Conftests register builders in a process-wide registry. Remember what it held before
    # this session's conftests were imported and restore it at the end, so sequential
    # in-process sessions (pytester's inline runs) don't see each other's builders. Not
    # loaded yet means empty: nothing to import for a run whose conftests register none.
    registry = sys.modules.get(_REGISTRY_MODULE)
    early_config.stash[REGISTRY_SNAPSHOT_KEY] = (
        {} if registry is None else registry.REGISTRY.snapshot()
    )


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    from .config import Settings
    from .state import State, new_run_id

    settings = Settings.from_config(config)
    if _is_worker(config):
        # The controller decided the run id and the lock dir's path for every worker.
        workerinput: dict[str, Any] = config.workerinput  # type: ignore[attr-defined]
        state = State(
            settings,
            run_id=str(workerinput.get(WORKERINPUT_RUN_ID) or workerinput["testrunuid"]),
            worker=str(workerinput["workerid"]),
            controller_pid=int(workerinput[WORKERINPUT_CONTROLLER_PID]),
            lock_dir=Path(workerinput[WORKERINPUT_LOCK_DIR]),
        )
    else:
        if settings.lock_dir.value is not None:
            _check_lock_dir(settings.lock_dir.value, settings.lock_dir.source, settings)
        state = State(settings, run_id=new_run_id(), worker="main", controller_pid=os.getpid())
    config.stash[STATE_KEY] = state
    config.addinivalue_line("markers", MARKER_LINE)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config), "prewarm-xdist-hooks")


def _check_lock_dir(path: Path, source: str, settings: Settings) -> None:
    """A lock dir the user named that cannot work fails now, with nothing created.

    That includes one pinned to the other lock mode than the one asked for: found only
    at the first request, it failed every test that asked for a template.
    """
    # "from .x import y", never "from . import x": after an in-process run (pytester's)
    # drops the modules it imported, the package still holds the old ones as attributes,
    # and old and new exception classes would not catch each other.
    from .exceptions import LockDirError
    from .lockdir import check_at_start, check_pin_at_start

    try:
        check_at_start(path, source)
        check_pin_at_start(path, settings.lock_mode.value, settings.lock_mode.source)
    except LockDirError as exc:
        raise pytest.UsageError(f"prewarm: {exc}") from exc


def pytest_report_header(config: pytest.Config) -> str | None:
    # The settings line goes into the summary of a run that used a template; the header
    # shows it only under -v, for the runs (most of them) that use none.
    state = config.stash.get(STATE_KEY, None)
    if state is None or config.get_verbosity() < 1:
        return None
    requested = state.settings.lock_mode
    why = "requested" if requested.source != "default" else "default; chosen on first use"
    return settings_line(state, str(requested.value), why)


def settings_line(state: State, mode: str, why: str) -> str:
    s = state.settings
    where = "per-run default" if state.default_dir else s.lock_dir.source
    return (
        f"prewarm: lock dir {state.lock_dir} ({where}), lock mode {mode} ({why}), "
        f"timeout {s.timeout.value:g} s, stale window {s.stale_after.value:g} s"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    try:
        return (yield)
    finally:
        _flush(item.config)


def _flush(config: pytest.Config | None) -> None:
    state = None if config is None else config.stash.get(STATE_KEY, None)
    if state is not None and state.core is not None:
        state.core.log.flush()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    core = state.core
    if core is not None and core.eager_builds is not None:
        # Let a background build finish (or fail) rather than abandon it half-way, unless
        # the run was interrupted: then nothing is waited for.
        core.eager_builds.finish(
            state.settings.timeout.value,
            interrupted=exitstatus == pytest.ExitCode.INTERRUPTED,
        )
    _flush(config)
    if _is_worker(config):
        # Always sent, even empty: the controller takes a missing key for a crashed worker.
        output: dict[str, Any] = config.workeroutput  # type: ignore[attr-defined]
        output[WORKEROUTPUT_EVENTS] = [] if core is None else [e.to_dict() for e in core.log.events]
        if core is not None:
            output[WORKEROUTPUT_LOCK_MODE] = [str(core.lock_mode), core.lock_mode_why]


def _run_events(state: State) -> list[TemplateEvent]:
    """The whole run's events; nothing is read or imported for a run that used no template."""
    if state.core is not None:
        log = state.core.log
    elif state.reported or _dir_may_hold_events(state):
        from .events import EventLog
        from .layout import Layout

        log = EventLog(Layout(state.lock_dir), state.run_id, state.worker)
    else:
        return []
    for worker, dicts in state.reported:
        log.add_reported(worker, dicts)
    state.reported = []  # added once, even if the summary is asked for twice
    return log.merged()


def _dir_may_hold_events(state: State) -> bool:
    # Only a controller that started workers (and so named the path) can find events of
    # crashed workers on disk, and only if some process made the lock dir.
    return state.lock_dir_known and os.path.isdir(state.lock_dir)


@pytest.hookimpl(wrapper=True, trylast=True, specname="pytest_sessionfinish")
def pytest_sessionfinish_teardowns(session: pytest.Session) -> Any:
    # Innermost wrapper: its second half runs after every plain sessionfinish hook, so
    # after xdist's, which brings the workers down; and before the terminal summary,
    # which an outer wrapper (the terminal reporter's) writes after it.
    result = yield
    state = session.config.stash.get(STATE_KEY, None)
    if state is None or _is_worker(session.config):
        return result
    if state.core is None and not _dir_may_hold_events(state):
        return result  # no process of this run made the lock dir: no service to end
    from .layout import Layout

    layout = state.core.store.layout if state.core is not None else Layout(state.lock_dir)
    if not layout.services_root.is_dir():
        return result  # no template with a teardown was built: nothing to load or do
    from . import teardown
    from .liveness import own_record

    runner = own_record("controller", state.run_id, state.controller_pid)
    state.teardowns = teardown.finish(
        layout,
        state.run_id,
        runner=runner,
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
    _summary(terminalreporter, state)
    _report_write_errors(terminalreporter)


def _summary(terminalreporter: pytest.TerminalReporter, state: State) -> None:
    config = terminalreporter.config
    events = _run_events(state)
    torn = [r.to_dict() for r in state.teardowns or ()]
    if state.settings.keys_path is not None and not config.option.collectonly:
        from .keys import from_events

        _write(config, state.settings.keys_path, from_events(events), KEYS_REPORT)
    if not events and not torn and state.settings.json_path is None:
        return
    from .report import dumps, format_summary, summarize, to_json

    mode, why = state.mode_in_use()
    summaries = summarize(events)  # once for both: a run may have 10,000 waits
    if state.settings.json_path is not None:
        settings = state.settings.as_dict(lock_dir=state.lock_dir, lock_mode=mode)
        data = to_json(events, settings, teardowns=torn, summaries=summaries)
        _write(config, state.settings.json_path, dumps(data), JSON_REPORT)
    lines = format_summary(
        events,
        top=state.settings.report_top,
        verbosity=config.get_verbosity(),
        teardowns=torn,
        summaries=summaries,
    )
    if not lines:
        return
    terminalreporter.write_sep("=", "prewarm summary")
    for line in lines:
        terminalreporter.write_line(line)
    if config.get_verbosity() < 0:
        return  # -q: the per-template lines only
    terminalreporter.write_line(settings_line(state, mode, why))
    keep = state.settings.keep_runs
    if state.default_dir and keep > 0:
        terminalreporter.write_line(
            f"prewarm: this run's templates stay in {state.lock_dir} (the per-run lock dirs "
            f"of the last {keep} runs are kept; --prewarm-keep-runs)"
        )


# What each report file is, and the option that asks for it (its ini twin: prewarm_json...).
JSON_REPORT = ("JSON report", "--prewarm-json")
KEYS_REPORT = ("template keys", "--prewarm-keys")
# Why each report file the run asked for could not be written: one line each, printed at
# the end of the terminal summary (--collect-only writes the keys before there is one).
REPORT_ERRORS_KEY = pytest.StashKey[list[str]]()


def _write(config: pytest.Config, path: Path, text: str, report: tuple[str, str]) -> None:
    """Write ``text`` to ``path`` whole, or not at all; a failure is kept for the summary.

    A temporary file in the same directory is written, flushed to disk and renamed over
    ``path``: a full disk (or a crash) never leaves an empty or truncated report where CI
    reads one, and an older report there is replaced only by a complete new one. An
    OSError is not raised: a traceback at the end of the run would hide the summary and
    the pass line; _report_write_errors says what failed and fails the run instead.
    """
    tmp: Path | None = None
    # The user named this path, outside the lock dir: a link there is theirs and is
    # written through, as a plain open() would, not replaced by a file of its own.
    target = Path(os.path.realpath(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL under a random name: never an existing file, nor one planted as a link.
        # Mode 0o666 less the umask, as a plain open() would make the report.
        tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(tmp, flags, 0o666), "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            # One fsync per report, at the end of the run: cheap, and without it a crash
            # soon after the rename can leave an empty file on some filesystems.
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        from .exceptions import DISK_FULL

        what, option = report
        fix = "free space on that filesystem or give" if exc.errno in DISK_FULL else "give"
        config.stash.setdefault(REPORT_ERRORS_KEY, []).append(
            f"prewarm: cannot write the {what} ({option}) to {path}: "
            f"{exc.strerror or exc}. This run's report is not there (an older file at that "
            f"path is left as it was); {fix} {option} another path"
        )


def _report_write_errors(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    errors = config.stash.get(REPORT_ERRORS_KEY, [])
    if not errors:
        return
    for line in errors:
        terminalreporter.write_line(line, red=True)
    # The user asked for the file and CI will look for it: a run that did not write it
    # must not pass, as a failing teardown (pytest_sessionfinish_teardowns) and pytest's
    # --max-warnings fail a run whose tests all passed. Exit status 1 (TESTS_FAILED): what
    # CI reads as "this run failed"; a full disk is neither a usage error (4, found at
    # start-up) nor an internal error (3, a bug, with a traceback), and --max-warnings' 6
    # is not in every pytest we support. junitxml, the peer, lets the OSError escape (a
    # traceback, and the pass line lost). A run that already failed keeps its status.
    # The hook has no session argument; pytest registers the session as plugin "session".
    session = config.pluginmanager.get_plugin("session")
    if isinstance(session, pytest.Session) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    registry = sys.modules.get(_REGISTRY_MODULE)
    snapshot = config.stash.get(REGISTRY_SNAPSHOT_KEY, None)
    if registry is not None and snapshot is not None:
        registry.REGISTRY.restore(snapshot)
    marker = sys.modules.get(_MARKER_MODULE)
    if marker is not None:
        marker.forget()  # markers found valid against the registry just restored
    state = config.stash.get(STATE_KEY, None)
    if state is None or _is_worker(config):
        return
    if state.core is None and not _dir_may_hold_events(state):
        return  # no process of this run made or used the lock dir: nothing to clean
    from .lockdir import forget_run, retire_run_dir

    if state.default_dir:
        retire_run_dir(state.lock_dir, keep=state.settings.keep_runs)
    else:
        # A shared lock dir keeps templates across runs, but not per-run bookkeeping.
        forget_run(state.lock_dir, state.run_id)


class XdistHooks:
    """Hooks that exist only when pytest-xdist is loaded (it must never be imported here)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        state = self.config.stash[STATE_KEY]
        node.workerinput[WORKERINPUT_LOCK_DIR] = str(state.lock_dir)
        node.workerinput[WORKERINPUT_RUN_ID] = state.run_id
        node.workerinput[WORKERINPUT_CONTROLLER_PID] = state.controller_pid

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        state = self.config.stash[STATE_KEY]
        output = getattr(node, "workeroutput", None) or {}
        received = output.get(WORKEROUTPUT_EVENTS)
        if received is None:
            return  # crashed: its events are read from the lock dir at summary time
        if received:  # a worker that used no template adds nothing, nor loads the event log
            state.reported.append((str(node.workerinput["workerid"]), received))
        mode = output.get(WORKEROUTPUT_LOCK_MODE)
        # The report names why the mode was chosen: the worker that chose it says so, the
        # others only found it pinned.
        if mode is not None and (state.reported_mode is None or PINNED in state.reported_mode[1]):
            state.reported_mode = (str(mode[0]), str(mode[1]))


@pytest.fixture(scope="session")
def prewarmed_template(request: pytest.FixtureRequest) -> TemplateFactory:
    """Get a template built once per test run across all xdist workers.

    ``prewarmed_template(name, build=None, *, key=None, timeout=None, configure=None,
    requires=(), teardown=None)`` returns a
    :class:`pytest_prewarm.Template` (``os.PathLike``; ``.path``, ``.name``, ``.key``,
    ``.value``). The first process to take the template's lock calls ``build(path)`` on an
    empty directory; every other process waits, then gets the same published directory.
    Without ``build``, the builder registered with ``@pytest_prewarm.template(name)`` is used.
    ``teardown(path, value)``, a module-level function, stops what the build started,
    exactly once after the last test of the run that could use it (docs/usage.md).
    Annotate it as :class:`pytest_prewarm.TemplateFactory`.
    """
    state = request.config.stash[STATE_KEY]
    # Asking for the factory is asking for templates: the lock dir and the core are made
    # now, in the fixture's setup, so that the first call goes straight to the lock.
    _core_or_fail(state)

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
        template: Template = state.get(
            name, build, key, timeout, configure=configure, requires=requires, teardown=teardown
        )
        return template

    return get


def _core_or_fail(state: State) -> None:
    """Make the core, or fail the test in one line when the lock dir cannot be used.

    Such an error (a lock dir pinned to the other lock mode, a full disk while making the
    layout, a dir swapped since start-up) says all there is to say; a traceback through
    the plugin's internals in every test that asks would bury it.
    """
    __tracebackhide__ = True
    from .exceptions import LockDirError

    try:
        state.get_core()
        return
    except LockDirError as exc:
        message = f"prewarm: {exc}"
    pytest.fail(message, pytrace=False)  # outside the handler: no chained traceback


ITEM_TEMPLATES_KEY = pytest.StashKey[dict[str, "Template"]]()


@pytest.fixture
def prewarmed(request: pytest.FixtureRequest) -> dict[str, Template]:
    """The templates named by this test's ``@pytest.mark.prewarm(...)`` markers, by name.

    They are ready before the test's setup; ``prewarmed["db"].path`` is the directory.
    """
    return dict(request.node.stash.get(ITEM_TEMPLATES_KEY, {}))


def _may_be_marked(item: pytest.Item) -> bool:
    # The keywords hold the names of the item's markers and of its parents' (and other
    # words: a test named "prewarm" only costs a full look). A dict lookup per node, where
    # iter_markers builds the node chain: collecting 10,000 tests must cost what it costs
    # without the plugin.
    return MARKER in item.keywords


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    result = yield
    if result is None:
        return result
    # Validate markers while collecting, so a typo fails as a collection error that names
    # the test, on every worker alike, instead of an error in each test's setup.
    items = result if isinstance(result, list) else [result]
    for item in items:
        if isinstance(item, pytest.Item) and _may_be_marked(item):
            from .exceptions import PrewarmUsageError
            from .marker import marker_names

            try:
                marker_names(item)
            except PrewarmUsageError as exc:
                raise collector.CollectError(str(exc)) from None
    return result


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is not None and state.settings.keys_path and session.config.option.collectonly:
        _write_selection_keys(session.config, state, session.items)
    if (
        state is None
        or not state.settings.eager
        or not session.items
        or session.config.option.collectonly
    ):
        return
    marked = [item for item in session.items if _may_be_marked(item)]
    if not marked:
        return
    from .eager import EagerBuilds
    from .exceptions import PrewarmError
    from .marker import needed_by

    names = needed_by(marked)
    if not names:
        return  # "prewarm" was only a keyword (a directory of that name), not a marker
    try:
        core = state.get_core()
        requests = [state.request_for(n) for n in names]
    except PrewarmError:
        return  # no early builds; each test that needs a template gets this error itself
    core.eager_builds = EagerBuilds(
        core.store,
        requests,
        workers=_worker_count(),
        threads=state.settings.eager_threads,
    ).start()


@pytest.hookimpl(trylast=True, specname="pytest_collection_finish")
def pytest_collection_finish_load_core(session: pytest.Session) -> None:
    # trylast: a worker has sent its collection to the controller by now, so these
    # imports overlap with the controller's scheduling instead of delaying it.
    if (
        STATE_KEY in session.config.stash
        and not session.config.option.collectonly
        and any(FIXTURE_NAME in getattr(item, "fixturenames", ()) for item in session.items)
    ):
        from .state import load_core

        load_core()


def _worker_count() -> int:
    """How many xdist workers share the marked templates (1 without xdist)."""
    raw = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _write_selection_keys(config: pytest.Config, state: State, items: list[pytest.Item]) -> None:
    """``--collect-only --prewarm-keys``: the keys of the marked templates, nothing built."""
    from .keys import from_requests
    from .marker import needed_by
    from .names import canonical_key
    from .request import Request

    requests = [state.request_for(name) for name in needed_by(items)]
    canonical = {}
    pending = list(requests)
    while pending:
        request = pending.pop()
        canonical[request.name] = canonical_key(request.key, name=request.name)
        pending += [r for r in request.requires if isinstance(r, Request)]
    assert state.settings.keys_path is not None
    _write(config, state.settings.keys_path, from_requests(requests, canonical), KEYS_REPORT)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    __tracebackhide__ = True  # users need the builder's frames, not ours
    if not _may_be_marked(item):
        return
    from .marker import marker_names

    names = marker_names(item)
    if not names:
        return  # "prewarm" was only a keyword (a directory of that name), not a marker
    state = item.config.stash[STATE_KEY]
    _core_or_fail(state)
    item.stash[ITEM_TEMPLATES_KEY] = {name: state.get(name) for name in names}
