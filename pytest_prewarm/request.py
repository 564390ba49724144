"""One request for a template, from start to end: check, wait, build, publish, record.

``TemplateStore`` is the per-process front: it caches results, keeps threads of one process
from building the same template twice, and hands each uncached request to ``_Fetch``, which
owns that request alone. Publication is a staging directory filled by the builder, meta.json
written last, then one rename: a reader sees no template or a complete one. A failure is
recorded once per run, so every other request of the run fails fast with its cause.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import clock
from .events import TemplateEvent
from .exceptions import (
    PrewarmBuildError,
    PrewarmLockError,
    PrewarmTimeout,
    PrewarmUsageError,
    timeout_hint,
)
from .files import delete_in_background, write_atomic
from .kinds import LockMode, Origin, Outcome
from .layout import DATA_DIR, META_FILE, Layout, template_id
from .liveness import Identity, Liveness, boot_id
from .locking import Acquired, Holder, Lock
from .locks import lock_factory
from .names import canonical_key, check_name
from .records import Meta, failure_to_json, hold_id, read_failure
from .registry import Registry

Builder = Callable[[Path], Any]


class Template(os.PathLike[str]):
    """A published template. ``os.fspath(template)`` is its directory.

    ``value`` is the JSON round-trip of what the builder returned (a port, a DSN, a
    version...), identical in every process. ``origin`` says how this process got it:
    ``"built"``, ``"waited"`` (another worker built it) or ``"reused"`` (already
    published, for example by an earlier run sharing the lock dir).
    """

    __slots__ = ("built_by", "key", "name", "origin", "path", "value")

    def __init__(
        self, name: str, key: Any, path: Path, value: Any, origin: str, built_by: str
    ) -> None:
        self.name = name
        self.key = key
        self.path = path
        self.value = value
        self.origin = origin
        self.built_by = built_by

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other

    def __repr__(self) -> str:
        return (
            f"Template(name={self.name!r}, key={self.key!r}, path={str(self.path)!r}, "
            f"origin={str(self.origin)!r}, built_by={self.built_by!r})"
        )


class TemplateFactory(Protocol):
    """The type of the ``prewarmed_template`` fixture, for annotating tests and fixtures."""

    def __call__(
        self,
        name: str,
        build: Builder | None = None,
        *,
        key: Any = None,
        timeout: float | None = None,
    ) -> Template: ...


@dataclass(frozen=True)
class Request:
    name: str
    build: Builder
    key: Any
    timeout: float
    timeout_source: str = "default"

    @property
    def timeout_hint(self) -> str:
        return timeout_hint(self.timeout, self.timeout_source)


def check_timeout(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PrewarmUsageError(
            f"timeout {value!r} for template {name!r} must be a positive number of seconds"
        )
    return float(value)


def make_request(
    name: str,
    build: Builder | None,
    key: Any,
    timeout: float | None,
    *,
    registry: Registry,
    default_timeout: float,
    default_source: str,
) -> Request:
    """The request for a call ``prewarmed_template(name, build, key=..., timeout=...)``.

    Without ``build``, the builder (and key) registered under ``name`` is used.
    """
    registered = registry.get(name) if isinstance(name, str) else None
    if build is None:
        if registered is None:
            known = ", ".join(registry.names()) or "none"
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
        return Request(name, build, key, default_timeout, default_source)
    return Request(name, build, key, check_timeout(timeout, name=str(name)), "timeout= in the call")


Notice = Callable[[str, float, Holder], None]


class TemplateStore:
    """Gets templates for one process, building each at most once per run across processes."""

    def __init__(
        self,
        lock_dir: Path,
        *,
        run_id: str,
        worker: str,
        rebuild: bool = False,
        notice_every: float = 10.0,
        on_notice: Notice | None = None,
        lock_mode: str = LockMode.FLOCK,
        stale_after: float = 60.0,
        heartbeat: float = 2.0,
    ) -> None:
        self.layout = Layout(lock_dir)
        self.lock_dir = lock_dir
        self.run_id = run_id
        self.worker = worker
        self.rebuild = rebuild
        self.notice_every = notice_every
        self.on_notice = on_notice
        # The lock implementation is chosen here, once; requests never ask which it is.
        self.open_lock = lock_factory(
            LockMode(lock_mode), stale_after=stale_after, heartbeat=heartbeat
        )
        self.identity = Identity(worker, run_id)
        self.boot_id = boot_id()
        self.events: list[TemplateEvent] = []
        self.on_event: Callable[[TemplateEvent], None] | None = None
        self._results: dict[str, Template | PrewarmBuildError] = {}
        self._guards: dict[str, threading.Lock] = {}
        self._guards_lock = threading.Lock()
        self._guard_owners: dict[str, int] = {}  # tid -> thread ident holding its guard
        self.layout.ensure()
        # Background deletions die with their process; finish any that were cut short.
        for leftover in self.layout.trash.iterdir():
            delete_in_background(leftover)

    def template_id(self, name: str, canonical: str) -> str:
        return template_id(name, canonical)

    def published_dir(self, tid: str) -> Path:
        return self.layout.template_dir(tid)

    def forget_run(self) -> None:
        """Remove this run's failure records; a later run must try again anyway."""
        for path in self.layout.failures_of_run(self.run_id):
            try:
                path.unlink()
            except OSError:
                continue

    def get(self, request: Request) -> Template:
        """The template, built here or by another process; waits up to the timeout."""
        __tracebackhide__ = True  # users need the builder's frames, not ours
        result = self._get(request, wait=True)
        assert result is not None
        return result

    def build_if_free(self, request: Request) -> bool:
        """Build the template if nobody is on it; return at once if it is held or done.

        Used by eager prewarming: a worker that finds a template's lock taken moves on
        to the next template instead of waiting. A failure is kept and raised to the
        tests that need the template, exactly as if they had built it themselves.
        """
        try:
            return self._get(request, wait=False) is not None
        except PrewarmBuildError:
            return True

    def emit(self, event: TemplateEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def _get(self, request: Request, *, wait: bool) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        name = check_name(request.name)
        canonical = canonical_key(request.key, name=name)
        tid = template_id(name, canonical)
        guard = self._guard(tid)
        me = threading.get_ident()
        if self._guard_owners.get(tid) == me:
            raise PrewarmUsageError(
                f"template {name!r} was requested while it is being built in this thread: "
                "a builder must not request its own template"
            )
        if not wait:
            if not guard.acquire(blocking=False):
                return None  # another thread of this process is getting it
        elif not guard.acquire(timeout=request.timeout):
            # Another thread of this process (an eager background build) holds it.
            raise PrewarmTimeout.waiting_for(
                name,
                str(self.layout.lock_file(tid)),
                request.timeout,
                f"another thread of this process ({self.worker}, pid {os.getpid()}) is building it",
                request.timeout_hint,
            )
        self._guard_owners[tid] = me
        try:
            cached = self._results.get(tid)
            if isinstance(cached, PrewarmBuildError):
                raise cached
            if cached is not None:
                return cached
            try:
                template = _Fetch(self, request, tid, canonical).run(wait=wait)
            except PrewarmBuildError as exc:
                self._results[tid] = exc  # one attempt per run, in this process too
                raise
            if template is not None:
                self._results[tid] = template
            return template
        finally:
            del self._guard_owners[tid]
            guard.release()

    def _guard(self, tid: str) -> threading.Lock:
        # Threads of one process (an eager background build and a test) serialise here,
        # before the cross-process lock, so a builder never runs concurrently with itself.
        with self._guards_lock:
            return self._guards.setdefault(tid, threading.Lock())


@dataclass(frozen=True)
class _Failed:
    error: PrewarmBuildError


_Done = _Failed | Meta


class _Fetch:
    """One uncached request for one template in this process, start to end."""

    def __init__(self, store: TemplateStore, request: Request, tid: str, canonical: str) -> None:
        self.store = store
        self.request = request
        self.name = request.name
        self.tid = tid
        self.canonical = canonical
        self.layout = store.layout
        self.lock: Lock = store.open_lock(store.layout, tid, request.name)
        self._to_delete: list[Path] = []

    # -- start to end ------------------------------------------------------------------------

    def run(self, *, wait: bool) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        # Fast path without touching the lock: already published or failed in this run.
        done = self._check_done()
        waited = 0.0
        acquired: Acquired | None = None
        if done is None and not wait:
            acquired = self.lock.try_acquire(self.store.identity.record(self.name))
            if acquired is None:
                return None
            done = self._check_done()  # finished between our check and our lock?
            if done is not None:
                self.lock.release()
                return None
        elif done is None:
            done, acquired, waited = self._acquire_or_wait()
        if isinstance(done, _Failed):
            self._event(Outcome.FAILED, waited, built_by=done.error.worker, error=done.error.cause)
            raise done.error
        if done is not None:
            same_run = done.run_id == self.store.run_id
            origin = Origin.WAITED if waited > 0 and same_run else Origin.REUSED
            self._event(Outcome(origin), waited, built_by=done.built_by)
            return self._template(done, origin)
        assert acquired is not None
        try:
            return self._build(acquired, waited)
        finally:
            self.lock.release()
            self._empty_trash()

    # -- checking and waiting ------------------------------------------------------------------

    def _check_done(self) -> _Done | None:
        failure = read_failure(self.layout.failure_file(self.tid, self.store.run_id))
        if failure is not None:
            return _Failed(failure)
        meta = Meta.read(self.layout.meta_file(self.tid))
        if meta is None:
            return None
        if self.store.boot_id is None or meta.boot_id != self.store.boot_id:
            # Published in another boot: without fsync the data may be torn, so rebuild.
            return None
        if self.store.rebuild and meta.run_id != self.store.run_id:
            return None
        return meta

    def _acquire_or_wait(self) -> tuple[_Done | None, Acquired | None, float]:
        """``(done, None, waited)`` once the work is done elsewhere, or ``(None, acquired,
        waited)`` once the lock is ours and the work is still to do.

        Raises PrewarmTimeout after the request's timeout, naming the holder.
        """
        __tracebackhide__ = True  # users need the builder's frames, not ours
        lock, store = self.lock, self.store
        start = clock.monotonic()
        deadline = start + self.request.timeout
        next_notice = start + store.notice_every
        try:
            while True:
                done = self._check_done()
                if done is not None:
                    return done, None, clock.monotonic() - start
                acquired = lock.try_acquire(store.identity.record(self.name))
                if acquired is not None:
                    # Someone may have finished between our check and our lock: check again.
                    done = self._check_done()
                    if done is not None:
                        lock.release()
                        return done, None, clock.monotonic() - start
                    return None, acquired, clock.monotonic() - start
                now = clock.monotonic()
                if now >= deadline:
                    error = PrewarmTimeout.waiting_for(
                        self.name,
                        str(lock.lock_path),
                        now - start,
                        lock.holder().describe(),
                        self.request.timeout_hint,
                    )
                    self._event(Outcome.TIMEOUT, error.waited, error=str(error).splitlines()[0])
                    raise error
                lock.wait_for_change(min(deadline, next_notice))
                if clock.monotonic() >= next_notice:
                    next_notice += store.notice_every
                    if store.on_notice is not None:
                        store.on_notice(self.name, clock.monotonic() - start, lock.holder())
        finally:
            lock.stop_waiting()

    # -- building and publishing -------------------------------------------------------------

    def _build(self, acquired: Acquired, waited: float) -> Template:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        recovered = acquired.recovered_from()
        verdict = acquired.previous_verdict
        if recovered and verdict is not None and verdict.state is Liveness.ALIVE:
            recovered += " (lock released without a clean release)"  # pragma: no cover
        self._sweep_staging()
        attempt = self.layout.new_attempt(self.tid)
        data = attempt / DATA_DIR
        data.mkdir(mode=0o700, parents=True)
        started = clock.monotonic()
        try:
            returned = self.request.build(data)
            value = _json_round_trip(returned, self.name)
        except Exception as exc:
            build_seconds = clock.monotonic() - started
            self._trash(attempt)
            # Lease mode: a successor that took over moved our staging away, which is
            # likely why the build failed. Not the builder's fault: record nothing.
            try:
                self.lock.confirm_held("abandoned")
            except PrewarmLockError as lost:
                raise lost from exc
            error = self._record_failure(exc)
            self._event(
                Outcome.FAILED,
                waited,
                build_seconds=build_seconds,
                built_by=self.store.worker,
                error=error.cause,
                recovered_from=recovered,
            )
            raise error from exc
        except BaseException:
            # Interrupted (Ctrl-C, pytest.exit, a timeout plugin): not the builder's fault,
            # so no failure record; the next run or worker builds afresh.
            self._trash(attempt)
            raise
        build_seconds = clock.monotonic() - started
        meta = Meta(
            name=self.name,
            key=self.canonical,
            value=value,
            built_by=self.store.worker,
            pid=os.getpid(),
            run_id=self.store.run_id,
            boot_id=self.store.boot_id,
            build_seconds=build_seconds,
            published_at=clock.wall(),
            holder=hold_id(self.lock.held_by()),
        )
        self._publish(attempt, meta)
        # Release before any bookkeeping: waiters are woken by the release, and every
        # microsecond spent here is added to each of their waits.
        self.lock.release(finished=True)
        self._event(
            Outcome.BUILT,
            waited,
            build_seconds=build_seconds,
            built_by=self.store.worker,
            recovered_from=recovered,
        )
        return self._template(meta, Origin.BUILT)

    def _publish(self, attempt: Path, meta: Meta) -> None:
        # The marker goes in last, then one rename makes the whole directory visible:
        # a reader sees no template or a complete one, never a partial one.
        try:
            self._confirm_held(attempt)
            (attempt / META_FILE).write_text(meta.to_json(), encoding="utf-8")
            self._confirm_held(attempt)
        except FileNotFoundError:
            # A successor that took over our lease moved our staging away.
            self._confirm_held(attempt)
            raise
        published = self.layout.template_dir(self.tid)
        if published.exists():
            self._trash(published)  # stale: other boot, or --prewarm-rebuild
        os.rename(attempt, published)

    def _confirm_held(self, attempt: Path) -> None:
        try:
            self.lock.confirm_held("discarded")
        except PrewarmLockError:
            self._trash(attempt)
            raise

    def _record_failure(self, exc: BaseException) -> PrewarmBuildError:
        error = PrewarmBuildError(
            template=self.name,
            exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            exc_message=str(exc),
            traceback_text=_builder_traceback(exc),
            worker=self.store.worker,
            pid=os.getpid(),
        )
        path = self.layout.failure_file(self.tid, self.store.run_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(path, failure_to_json(error))
        return error

    # -- housekeeping ------------------------------------------------------------------------

    def _sweep_staging(self) -> None:
        # We hold the exclusive lock, so any staging of this template belongs to a builder
        # that died. Moving it aside is one rename; deleting can wait (facts: 3-4 ms saved).
        staging_root = self.layout.staging_root(self.tid)
        staging_root.mkdir(mode=0o700, exist_ok=True)
        for orphan in staging_root.iterdir():
            self._trash(orphan)

    def _trash(self, path: Path) -> None:
        target = self.layout.trash_target(path.name)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        self._to_delete.append(target)

    def _empty_trash(self) -> None:
        # Deleting is deferred until the lock is released: a deleting thread competes with
        # the builder for the GIL, which delayed takeovers by milliseconds.
        while self._to_delete:
            delete_in_background(self._to_delete.pop())

    # -- results -------------------------------------------------------------------------------

    def _event(
        self,
        outcome: Outcome,
        waited: float,
        *,
        build_seconds: float | None = None,
        built_by: str | None = None,
        error: str | None = None,
        recovered_from: str | None = None,
    ) -> None:
        self.store.emit(
            TemplateEvent(
                self.name,
                self.store.worker,
                outcome,
                waited,
                build_seconds,
                built_by,
                error=error,
                recovered_from=recovered_from,
                pid=os.getpid(),
            )
        )

    def _template(self, meta: Meta, origin: Origin) -> Template:
        return Template(
            name=meta.name,
            key=self.request.key,
            path=self.layout.data_dir(self.tid),
            value=meta.value,
            origin=origin,
            built_by=meta.built_by,
        )


def _builder_traceback(exc: BaseException) -> str:
    # The first frame is ours (the call into the builder); start at the builder's own.
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__ and tb.tb_next:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _json_round_trip(returned: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(returned, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise PrewarmUsageError(
            f"builder of template {name!r} returned {type(returned).__name__} "
            f"{_short_repr(returned)}, which is not JSON-serialisable ({exc}); return None, "
            "or a str/number/bool/list/dict that every worker can receive"
        ) from exc


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
