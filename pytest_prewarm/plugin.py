"""The pytest11 entry point: options, the ``prewarmed_template`` fixture, xdist wiring.

Hooks stay thin; the work happens in template.py (build once), lock.py (waiting) and
report.py (the summary).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import config as config_mod
from . import lockdir
from .config import Settings
from .events import TemplateEvent
from .exceptions import PrewarmUsageError
from .registry import REGISTRY
from .template import Request, Template, TemplateStore, check_timeout

WORKERINPUT_LOCK_DIR = "prewarm_lock_dir"
WORKERINPUT_RUN_ID = "prewarm_run_id"


@dataclass
class State:
    settings: Settings
    lock_dir: Path
    run_id: str
    worker: str
    owns_lock_dir: bool
    store: TemplateStore
    worker_events: list[dict[str, Any]] = field(default_factory=list)


STATE_KEY = pytest.StashKey[State]()


def pytest_addoption(parser: pytest.Parser) -> None:
    config_mod.addoption(parser)


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
    store = TemplateStore(
        lock_dir,
        run_id=run_id,
        worker=worker,
        rebuild=settings.rebuild,
        timeout_hint=settings.timeout_hint(),
        notice_every=settings.notice_after.value or float("inf"),
    )
    config.stash[STATE_KEY] = State(settings, lock_dir, run_id, worker, owns, store)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config), "prewarm-xdist-hooks")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is not None and state.owns_lock_dir:
        lockdir.remove_run_dir(state.lock_dir)


class XdistHooks:
    """Hooks that exist only when pytest-xdist is loaded (it must never be imported here)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        state = self.config.stash[STATE_KEY]
        node.workerinput[WORKERINPUT_LOCK_DIR] = str(state.lock_dir)
        node.workerinput[WORKERINPUT_RUN_ID] = state.run_id


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
        seconds = (
            state.settings.timeout.value
            if timeout is None
            else check_timeout(timeout, name=str(name))
        )
        return state.store.get(Request(name, build, key, seconds))

    return get


def events_of(config: pytest.Config) -> list[TemplateEvent]:
    state = config.stash.get(STATE_KEY, None)
    return [] if state is None else list(state.store.events)


__all__ = ["prewarmed_template"]
_ = os  # keep os imported for future hooks
