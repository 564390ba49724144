"""The plugin's state in one pytest process: decided at start-up, made on first use.

Start-up costs nothing the run may not need: it settles the run id and where the lock
dir will be, and nothing touches the filesystem. The lock dir, its mode pin and flock
probe, the template store and the event log are made when this process first asks for
templates (the ``prewarmed_template`` fixture's setup, or a marker found by collection),
and never in a run that asks for none. Every import of the request machinery happens here:
on that first use, or, when collection finds tests that use the fixture, at the end of
collection (``load_core``), which imports and creates nothing else.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .config import Settings
    from .eager import EagerBuilds
    from .events import EventLog
    from .kinds import LockMode
    from .locking import Holder
    from .request import Builder, Configure, Request, Teardown, Template, TemplateStore


class Core:
    """What a process holds once it has used a template."""

    def __init__(
        self, store: TemplateStore, log: EventLog, lock_mode: LockMode, lock_mode_why: str
    ) -> None:
        self.store = store
        self.log = log
        self.lock_mode = lock_mode
        self.lock_mode_why = lock_mode_why
        self.eager_builds: EagerBuilds | None = None


class State:
    """One pytest process's view of the run (controller, worker, or a run without xdist).

    ``lock_dir`` is the path every process of the run uses: the controller decides it
    (the per-run default is named by the run id) and sends it to the workers, so they
    agree without any of them creating anything before it is needed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        run_id: str,
        worker: str,
        controller_pid: int,
        lock_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.run_id = run_id
        self.worker = worker
        self.controller_pid = controller_pid
        self._lock_dir = lock_dir if lock_dir is not None else settings.lock_dir.value
        self.core: Core | None = None
        self._making = threading.Lock()  # the eager thread and a test may both be first
        # On the controller: what workers sent at their end (events, and the mode they used).
        self.reported: list[tuple[str, list[dict[str, Any]]]] = []
        self.reported_mode: tuple[str, str] | None = None
        self.teardowns: list[Any] | None = None  # teardown.Result of each teardown run here

    @property
    def default_dir(self) -> bool:
        """Whether the lock dir is the per-run default (the run's own, kept for a while)."""
        return self.settings.lock_dir.value is None

    @property
    def lock_dir_known(self) -> bool:
        """Whether the lock dir's path is settled (naming the default one asks the OS)."""
        return self._lock_dir is not None

    @property
    def lock_dir(self) -> Path:
        if self._lock_dir is None:
            from .rundir import run_dir_path  # a leaf: the controller of every xdist run

            self._lock_dir = run_dir_path(self.run_id)  # tempfile.gettempdir(): on demand
        return self._lock_dir

    def get_core(self) -> Core:
        """The lock dir, prepared, and the store: made by the first caller, once."""
        core = self.core
        if core is not None:
            return core
        with self._making:
            if self.core is None:
                self.core = _make_core(self)
            return self.core

    def get(
        self,
        name: str,
        build: Builder | None = None,
        key: Any = None,
        timeout: float | None = None,
        *,
        configure: Configure | None = None,
        requires: Sequence[Template | str] = (),
        teardown: Teardown | None = None,
    ) -> Any:
        """The template ``name`` (a ``Template``), built here or by another process."""
        __tracebackhide__ = True  # users need the builder's frames, not ours
        core = self.get_core()
        request = self.request_for(
            name, build, key, timeout, configure=configure, requires=requires, teardown=teardown
        )
        return core.store.get(request)

    def request_for(
        self,
        name: str,
        build: Builder | None = None,
        key: Any = None,
        timeout: float | None = None,
        *,
        configure: Configure | None = None,
        requires: Sequence[Template | str] = (),
        teardown: Teardown | None = None,
    ) -> Request:
        from .registry import REGISTRY
        from .request import make_request

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

    def mode_in_use(self) -> tuple[str, str]:
        """(mode, why) for the report: this process's, a worker's, the pin, or the request."""
        if self.core is not None:
            return str(self.core.lock_mode), self.core.lock_mode_why
        if self.reported_mode is not None:
            return self.reported_mode
        from .lockdir import read_pin

        pinned = read_pin(self.lock_dir)
        if pinned is not None:
            return str(pinned), "pinned in the lock dir by the first process to use it"
        return str(self.settings.lock_mode.value), "not chosen: no template was used"


def load_core() -> None:
    """Import what a first request needs, and do none of its work (nothing is created).

    Called when collection finds a test that uses the ``prewarmed_template`` fixture. The
    imports (about 10 ms of CPU per process) are then paid while the worker waits for the
    controller to hand out tests; paid in the first request, every worker pays them at
    the same moment on the way to the lock, and the build starts that much later.
    """
    # What _open imports, and flock: the lock of every request, and the probe of "auto".
    for module in ("events", "lockdir", "request", "flock"):
        importlib.import_module(f"{__package__}.{module}")


def _make_core(state: State) -> Core:
    try:
        return _open(state)
    except OSError as exc:  # a full disk or a vanished dir while making the layout
        from .exceptions import LockDirError

        raise LockDirError(
            f"cannot prepare lock dir {str(state.lock_dir)!r}: {exc.strerror or exc}; "
            "free space there, or pass another --prewarm-lock-dir"
        ) from exc


def _open(state: State) -> Core:
    from .events import EventLog
    from .lockdir import open_run_dir, prepare, settle_mode
    from .request import TemplateStore

    settings = state.settings
    path = state.lock_dir
    if state.default_dir:
        open_run_dir(path, state.run_id, state.controller_pid)
    else:
        prepare(path, settings.lock_dir.source)
    # The pin is create-once: the first process to use the dir decides, and one that
    # would choose otherwise fails instead of using locks the others do not see.
    mode, why = settle_mode(path, settings.lock_mode.value)
    store = TemplateStore(
        path,
        run_id=state.run_id,
        worker=state.worker,
        rebuild=settings.rebuild,
        notice_every=settings.notice_after.value or float("inf"),
        lock_mode=mode,
        stale_after=settings.stale_after.value,
        stale_after_source=settings.stale_after.source,
        heartbeat=settings.heartbeat,
        supplied=settings.supplied,
    )
    store.controller_pid = state.controller_pid
    store.teardown_timeout = settings.teardown_timeout.value
    log = EventLog(store.layout, state.run_id, state.worker)
    store.on_event = log.record
    store.on_notice = _notice_writer(state.worker)
    return Core(store, log, mode, why)


def _notice_writer(worker: str) -> Callable[[str, float, Holder], None]:
    from .console import emit

    def notice(template: str, waited: float, holder: Holder) -> None:
        emit(
            f"[prewarm] {worker} has waited {waited:.1f} s for template {template!r}, "
            f"{holder.describe()}"
        )

    return notice


def new_run_id() -> str:
    """A fresh run id (os.urandom: no uuid import at start-up)."""
    return os.urandom(16).hex()
