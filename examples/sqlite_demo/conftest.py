"""pytest-prewarm demo: one SQLite template per test run, a private copy per test.

The template is registered with ``@pytest_prewarm.template``. Under ``pytest -n 4`` exactly
one process runs ``build_shop_db``; the others wait for it and reuse the published directory.
Every test then copies the finished database into its own ``tmp_path``, so tests may insert,
update and delete freely without seeing each other's changes or touching the template.

To prove the "built once" claim rather than just state it, every process appends JSON lines to
a shared log (``PREWARM_DEMO_BUILD_LOG``): one ``build`` line from whoever ran the builder and
one ``use`` line, carrying the template value it received, from each process that ran tests.
The xdist controller checks the log at the end of the run and fails the run if the template
was built more than once or if two processes saw different values.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import shopdb

import pytest_prewarm

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterator

    from pytest_prewarm import Template

BUILD_LOG_ENV = "PREWARM_DEMO_BUILD_LOG"


@pytest_prewarm.template("shop_db")
def build_shop_db(path: Path) -> shopdb.Summary:
    """Build the shop database in the plugin's staging directory ``path``.

    The returned dict is the template's ``.value``: every worker receives this one value, so it
    carries both who built the template and the facts tests check their copies against.
    """
    started = time.perf_counter()
    summary = shopdb.build(path)
    _log_event("build")  # the log line carries this process's worker id and pid
    return {
        "built_by": _worker_id(),
        "pid": os.getpid(),
        **summary,
        "build_seconds": round(time.perf_counter() - started, 2),
    }


@pytest.fixture(scope="session")
def shop_template(prewarmed_template: Callable[[str], Template]) -> Template:
    """The published template; the first test on each worker waits here for the build."""
    template = prewarmed_template("shop_db")
    _log_event("use", value=template.value)
    return template


@pytest.fixture(scope="session")
def shop_summary(shop_template: Template) -> shopdb.Summary:
    """What the builder reported about the database: counts, revenue, best sellers, hash."""
    summary: shopdb.Summary = shop_template.value
    return summary


@pytest.fixture
def shop_db(shop_template: Template, tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to this test's own copy of the template database.

    The published template is shared by every test on every worker, so nobody opens it for
    writing. Copying an ~11 MB file takes milliseconds; rebuilding it takes seconds.
    """
    db_path = tmp_path / shopdb.DB_FILENAME
    shutil.copyfile(shop_template.path / shopdb.DB_FILENAME, db_path)
    conn = shopdb.connect(db_path)
    yield conn
    conn.close()


# --- the build log ------------------------------------------------------------------------


def _worker_id() -> str:
    # Set by pytest-xdist in its workers; a plain ``pytest`` run has only the main process.
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _log_event(event: str, **fields: Any) -> None:
    log_path = os.environ.get(BUILD_LOG_ENV)
    if not log_path:
        return
    line = json.dumps({"event": event, "worker": _worker_id(), "pid": os.getpid(), **fields})
    # O_APPEND makes each single small write land whole at the end of the file, even when
    # several workers log at the same moment.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


_log_path_key = pytest.StashKey[Path]()
_log_owned_key = pytest.StashKey[bool]()
_verdict_key = pytest.StashKey[tuple[bool, list[str]]]()


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    # Only the controller (or a plain, single-process run) sets up the log. xdist starts its
    # workers after this hook, and they inherit os.environ, so they all find the same file.
    if _is_xdist_worker(config):
        return
    preset = os.environ.get(BUILD_LOG_ENV)
    if preset:
        log_path = Path(preset)
        log_path.write_text("")  # a log describes one run
    else:
        fd, name = tempfile.mkstemp(prefix="prewarm-demo-", suffix=".jsonl")
        os.close(fd)
        log_path = Path(name)
        os.environ[BUILD_LOG_ENV] = name
    config.stash[_log_path_key] = log_path
    config.stash[_log_owned_key] = not preset


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_log_owned_key, False):
        config.stash[_log_path_key].unlink(missing_ok=True)
        os.environ.pop(BUILD_LOG_ENV, None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _is_xdist_worker(config) or _log_path_key not in config.stash:
        return
    lines = config.stash[_log_path_key].read_text().splitlines()
    ok, report = _check_log([json.loads(line) for line in lines if line])
    config.stash[_verdict_key] = (ok, report)
    if not ok and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _check_log(events: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    builds = [e for e in events if e["event"] == "build"]
    uses = [e for e in events if e["event"] == "use"]
    if not uses:
        return True, ["no test used the shop_db template"]
    users = ", ".join(sorted(e["worker"] for e in uses))
    values = {json.dumps(e["value"], sort_keys=True) for e in uses}
    report = [
        f"builder ran {len(builds)} time(s): "
        + (", ".join(f"{b['worker']} (pid {b['pid']})" for b in builds) or "-"),
        f"template used by {len(uses)} process(es): {users}",
        f"distinct template values seen: {len(values)}",
    ]
    value = uses[0]["value"]
    if len(values) != 1:
        report.append("FAILED: processes received different template values")
        return False, report
    if len(builds) > 1:
        report.append("FAILED: the template was built more than once")
        return False, report
    if not builds:
        # Nobody built in this run: legitimate only if the plugin reused an earlier build.
        report.append(f"OK: no build in this run; all reused pid {value['pid']}'s earlier build")
        return True, report
    build = builds[0]
    if (value["built_by"], value["pid"]) != (build["worker"], build["pid"]):
        report.append("FAILED: the value processes received is not the one that was built")
        return False, report
    report.append(
        f"OK: built once by {build['worker']} in {value['build_seconds']} s,"
        " the same value reached every process"
    )
    return True, report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    verdict = terminalreporter.config.stash.get(_verdict_key, None)
    if verdict is None:
        return
    ok, report = verdict
    terminalreporter.write_sep("-", "sqlite_demo build log", green=ok, red=not ok)
    for line in report:
        terminalreporter.write_line(line)
