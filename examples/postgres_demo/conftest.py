"""pytest-prewarm demo: one PostgreSQL server per run, a database per test.

Under ``pytest -n 4`` exactly one process starts the server and builds the template
database ``shop`` (``build_postgres``); every test gets a database of its own with
``CREATE DATABASE ... TEMPLATE shop``, dropped after the test. ``stop_postgres``, the
template's teardown, stops the server once, after the last test of the run, in the xdist
controller, or in a watcher process if the run was killed.

``PREWARM_DEMO_SERVER=per-worker`` swaps the template for a plain session fixture that
starts a server in every worker, the usual set-up this plugin replaces
(benchmarks/bench_postgres.py compares the two).

The controller prints how many servers were started and how many postgres processes are
left after the run; with the plugin it fails the run unless those are 1 and 0.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg
import pytest

import pytest_prewarm

SERVERS_LOG_ENV = "PREWARM_DEMO_SERVERS_LOG"  # one line per server started, shared by workers
PER_WORKER = os.environ.get("PREWARM_DEMO_SERVER") == "per-worker"


def _log_server(value: dict[str, Any]) -> None:
    line = json.dumps({"pid": os.getpid(), "home": value["home"], "port": value["port"]})
    with open(os.environ[SERVERS_LOG_ENV], "a", encoding="utf-8") as log:
        log.write(line + "\n")


def stop_postgres(path: Path, value: dict[str, Any]) -> None:
    pg.stop(value)


@pytest_prewarm.template("postgres", teardown=stop_postgres)
def build_postgres(path: Path) -> dict[str, Any]:
    value = pg.start(path)
    _log_server(value)
    return value


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The server's value: its port and the service record that stops it."""
    if PER_WORKER:
        path = request.getfixturevalue("tmp_path_factory").mktemp("postgres")
        value = build_postgres(path)
        yield value
        pg.stop(value)
        return
    yield request.getfixturevalue("prewarmed_template")("postgres").value


class Database:
    """A database of one test, made from the template ``shop``."""

    def __init__(self, server: dict[str, Any], name: str) -> None:
        self.server = server
        self.name = name

    def query(self, sql: str) -> list[list[str]]:
        return pg.psql(self.server, self.name, sql)

    def scalar(self, sql: str) -> int:
        [[value]] = self.query(sql)
        return int(value)


@pytest.fixture
def db(server: dict[str, Any]) -> Iterator[Database]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    pg.psql(server, "postgres", f"CREATE DATABASE {name} TEMPLATE {pg.TEMPLATE_DB}")
    yield Database(server, name)
    pg.psql(server, "postgres", f"DROP DATABASE {name}")


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _is_controller(config) and SERVERS_LOG_ENV not in os.environ:
        handle, name = tempfile.mkstemp(prefix="prewarm-demo-servers-", suffix=".jsonl")
        os.close(handle)
        os.environ[SERVERS_LOG_ENV] = name  # inherited by the workers xdist starts


SESSION_KEY = pytest.StashKey[pytest.Session]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[SESSION_KEY] = session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # After the plugin's teardowns (they run before the terminal summary is written).
    config = terminalreporter.config
    if not _is_controller(config):
        return
    log = Path(os.environ[SERVERS_LOG_ENV])
    servers = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    left = pg.server_processes([s["home"] for s in servers])
    terminalreporter.write_sep("=", "postgres demo")
    terminalreporter.write_line(f"servers started: {len(servers)}")
    terminalreporter.write_line(f"postgres processes left after the run: {len(left)}")
    if not PER_WORKER and (len(servers) != 1 or left):
        terminalreporter.write_line("FAILED: expected 1 server started and 0 processes left")
        config.stash[SESSION_KEY].exitstatus = pytest.ExitCode.TESTS_FAILED
