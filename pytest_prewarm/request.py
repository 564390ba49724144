"""One request for a template, from start to end: check, wait, build, publish, record.

``TemplateStore`` is the per-process front: it caches results, keeps threads of one process
from building the same template twice, and hands each uncached request to ``_Fetch``, which
owns that request alone. The builder fills a build directory that never moves, so a
template that records its own path (a virtualenv, an editable install, a database
cluster) works in place; publication is meta.json, naming that build, written last in one
rename: a reader sees no template or a complete one. A failure is recorded once per run,
so every other request of the run fails fast with its cause.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from . import clock
from .events import TemplateEvent
from .exceptions import (
    DISK_FULL,
    LockDirError,
    PrewarmBuildError,
    PrewarmConfigureError,
    PrewarmLockError,
    PrewarmTimeout,
    PrewarmUsageError,
    PrewarmWarning,
    timeout_hint,
)
from .files import delete_in_background, read_bounded, write_atomic
from .kinds import LockMode, Origin, Outcome
from .layout import DATA_DIR, META_FILE, Layout, template_id
from .liveness import Identity, Liveness, boot_id
from .locking import Acquired, Holder, Lock
from .locks import MIN_HEARTBEATS, default_stale_after, lock_factory
from .names import canonical_key, check_name
from .records import Meta, failure_to_json, hold_id, read_failure
from .registry import Registry
from .trust import check_dir, is_mine, kind_of, make_dir, remove_tree

if TYPE_CHECKING:
    # Loaded where they are used: a process that waits for a template, or reuses one,
    # never runs a build, records a failure or verifies a restored tree, and every
    # module less is one less to load in each worker's first request (see issue 13).
    from .capture import BuildOutput
    from .supply import Supplied
    from .teardown import Instance  # only templates with a teardown load teardown.py

Builder = Callable[..., Any]  # build(path), or build(path, layers) with requires=
Configure = Callable[["Template"], object]
Teardown = Callable[[Path, Any], object]  # teardown(path, value), see teardown.py


class Template(os.PathLike[str]):
    """A published template. ``os.fspath(template)`` is its directory.

    ``value`` is the JSON round-trip of what the builder returned (a port, a DSN, a
    version...), identical in every process. ``origin`` says how this process got it:
    ``"built"``, ``"waited"`` (another worker built it) or ``"reused"`` (already
    published, for example by an earlier run sharing the lock dir).
    """

    __slots__ = ("built_by", "digest", "key", "name", "origin", "path", "value")

    def __init__(
        self,
        name: str,
        key: Any,
        path: Path,
        value: Any,
        origin: str,
        built_by: str,
        digest: str | None = None,
    ) -> None:
        self.name = name
        self.key = key
        self.path = path
        self.value = value
        self.origin = origin
        self.built_by = built_by
        self.digest = digest  # of its tree at publication; None for a supplied one

    @property
    def identity(self) -> str:
        """What a template built on this one keys on: its content, or where it was supplied."""
        return self.digest or f"supplied:{self.path}"

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
        configure: Configure | None = None,
        requires: Sequence[Template | str] = (),
        teardown: Teardown | None = None,
    ) -> Template: ...


CALL_TIMEOUT = "timeout= in the call"  # Request.timeout_source of a timeout given in the call


class Request(NamedTuple):
    name: str
    build: Builder
    key: Any
    timeout: float
    timeout_source: str = "default"
    configure: Configure | None = None
    # The layers it is built on: templates already got, or requests for registered ones.
    requires: tuple[Request | Template, ...] = ()
    teardown: Teardown | None = None

    @property
    def timeout_hint(self) -> str:
        return timeout_hint(self.timeout, self.timeout_source)


def check_timeout(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PrewarmUsageError(
            f"timeout {value!r} for template {name!r} must be a positive number of seconds"
        )
    if not value <= clock.MAX_SECONDS:
        raise PrewarmUsageError(
            f"timeout {value!r} for template {name!r} is too large; the most is "
            f"{clock.MAX_SECONDS:g} s (about 3 years)"
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
    configure: Configure | None = None,
    requires: Sequence[Template | str] = (),
    chain: tuple[str, ...] = (),
    teardown: Teardown | None = None,
) -> Request:
    """The request for a call ``prewarmed_template(name, build, key=..., timeout=...)``.

    Without ``build``, the builder (and key, configure hook, layers and teardown)
    registered under ``name`` is used. Layers named by string are registered templates,
    requested in turn; ``chain`` is the names being resolved above this one, so a cycle is
    an error here, before anything is built or waited for.
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
        if configure is None:
            configure = registered.configure
        if not requires:
            requires = registered.requires
        if teardown is None:
            teardown = registered.teardown
    if not callable(build):
        raise PrewarmUsageError(f"build for template {name!r} is not callable: {build!r}")
    if configure is not None and not callable(configure):
        raise PrewarmUsageError(f"configure= for template {name!r} is not callable: {configure!r}")
    if teardown is not None:
        from .teardown import reference  # only templates with a teardown load it

        reference(teardown, str(name))  # a lambda fails here, not at the run's end
    if isinstance(requires, str | Template):
        requires = (requires,)
    layers: list[Request | Template] = []
    for layer in requires:
        if isinstance(layer, Template):
            layers.append(layer)
        elif isinstance(layer, str):
            if layer in (*chain, name):
                cycle = " -> ".join(repr(n) for n in (*chain, name, layer))
                raise PrewarmUsageError(
                    f"templates require each other in a cycle: {cycle}; a template cannot be "
                    "built on itself, so remove one of these requires="
                )
            layers.append(
                make_request(
                    layer,
                    None,
                    None,
                    None,
                    registry=registry,
                    default_timeout=default_timeout,
                    default_source=default_source,
                    chain=(*chain, name),
                )
            )
        else:
            raise PrewarmUsageError(
                f"requires= of template {name!r} holds {layer!r}; give Template objects (from "
                "prewarmed_template) or the names of registered templates"
            )
    if layers:
        _check_takes_layers(name, build)
    if timeout is None:
        seconds, source = default_timeout, default_source
    else:
        seconds, source = check_timeout(timeout, name=str(name)), CALL_TIMEOUT
    return Request(name, build, key, seconds, source, configure, tuple(layers), teardown)


def _check_takes_layers(name: str, build: Builder) -> None:
    """A builder with layers is called ``build(path, layers)``: say so before it runs."""
    try:
        inspect.signature(build).bind(Path(), {})
    except TypeError:
        raise PrewarmUsageError(
            f"template {name!r} has requires=, so its builder is called as "
            f"build(path, layers), with layers a dict of name -> Template; "
            f"{getattr(build, '__qualname__', build)!r} does not take two arguments"
        ) from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        return


Notice = Callable[[str, float, Holder], None]

# The shortest interval between two "still waiting" notices of one wait, whatever is
# configured: a tiny --prewarm-notice-after must not turn the wait into one notice per
# pass of its loop (thousands a second). A tenth of a second is still quick enough for
# anyone, or any test, that watches notices as a sign of progress.
MIN_NOTICE_EVERY = 0.1


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
        supplied: Mapping[str, Supplied] | None = None,
        stale_after_source: str = "default",
    ) -> None:
        self.layout = Layout(lock_dir)
        self.supplied = dict(supplied or {})
        self.lock_dir = lock_dir
        self.run_id = run_id
        self.worker = worker
        self.rebuild = rebuild
        self.notice_every = notice_every
        self.on_notice = on_notice
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        # Where the stale window came from, as config.Setting.source says it ("default..."
        # when it was derived from the timeout). A caller that does not say is taken to
        # have derived it: a call's timeout= then derives its own, which keeps the window
        # below that wait either way.
        self.stale_after_source = stale_after_source
        # The lock implementation is chosen here, once; requests never ask which it is.
        self.open_lock = lock_factory(
            LockMode(lock_mode), stale_after=stale_after, heartbeat=heartbeat
        )
        self.identity = Identity(worker, run_id)
        self.boot_id = boot_id()
        self.events: list[TemplateEvent] = []
        self.on_event: Callable[[TemplateEvent], None] | None = None
        self._results: dict[str, Template | PrewarmBuildError | PrewarmConfigureError] = {}
        self._guards: dict[str, threading.Lock] = {}
        self._guards_lock = threading.Lock()
        self._guard_owners: dict[str, int] = {}  # tid -> thread ident holding its guard
        # Templates with a teardown (teardown.py): the run's controller, whose end is the
        # run's end, and how long a teardown may take. A worker is told the pid.
        self.controller_pid = os.getpid()
        self.teardown_timeout = 60.0
        self._services: Any = None
        self.layout.ensure()
        # Background deletions die with their process; finish any that were cut short.
        for leftover in self.layout.trash.iterdir():
            delete_in_background(leftover)

    def services(self) -> Any:
        """This process's ``reaper.RunServices``: made, and reaper.py loaded, on first use."""
        if self._services is None:
            from .reaper import RunServices  # a run that builds no service never loads it

            self._services = RunServices(
                self.layout, self.run_id, self.worker, self.controller_pid, self.teardown_timeout
            )
        return self._services

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

    def stale_window(self, request: Request) -> float | None:
        """The stale window for ``request``'s lock when it is not the process's, else None.

        The configured window is checked against the configured timeout at start-up; a
        ``timeout=`` in the call must keep the same invariant, window strictly below the
        wait, or a crashed holder of unknown liveness makes the waiter time out instead of
        taking over. A derived window is derived again from the call's timeout, by the
        same rule; an explicit one that is not below it is a usage error at the call.

        The window judges *other* processes, which beat at the configured heartbeat: it
        never goes below MIN_HEARTBEATS of those beats, or a short ``timeout=`` would take
        a live holder's lease between two of its beats. Where that leaves no window below
        the call's timeout, the configured one stays: the wait may then time out behind a
        dead holder of unknown liveness (its message says so), but never robs a live one.
        """
        if request.timeout_source != CALL_TIMEOUT:
            return None
        if self.stale_after_source.startswith("default"):
            derived = max(default_stale_after(request.timeout), MIN_HEARTBEATS * self.heartbeat)
            if derived >= request.timeout:
                return None
            return None if derived == self.stale_after else derived
        if self.stale_after >= request.timeout:
            raise PrewarmUsageError(
                f"template {request.name!r}: the timeout {request.timeout:g} s (from "
                f"{CALL_TIMEOUT}) must be above the stale window {self.stale_after:g} s "
                f"(from {self.stale_after_source}), or a holder of unknown liveness that "
                "died would make this wait time out instead of taking over; pass a "
                "larger timeout=, or lower --prewarm-stale-after"
            )
        return None

    def emit(self, event: TemplateEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def _get(self, request: Request, *, wait: bool) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        name = check_name(request.name)
        stale_after = self.stale_window(request)  # a bad timeout= fails before any wait
        layers = {layer.name: layer for layer in map(self._layer, request.requires)}
        canonical = canonical_key(request.key, name=name)
        if layers:
            # Built on other templates: their content is part of its identity, so a changed
            # layer gives another id, and this template is built again on the new one.
            ids = {n: t.identity for n, t in sorted(layers.items())}
            canonical = f"{canonical} on {json.dumps(ids, sort_keys=True)}"
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
            if isinstance(cached, PrewarmBuildError | PrewarmConfigureError):
                raise cached.with_traceback(None)  # not one more frame per re-raise
            if cached is not None:
                return cached
            try:
                supplied = self.supplied.get(name)
                if supplied is not None:
                    template: Template | None = self._supplied(request, supplied)
                else:
                    template = self._fetch(
                        request, tid, canonical, layers, wait=wait, stale_after=stale_after
                    )
            except PrewarmBuildError as exc:
                self._results[tid] = exc  # one attempt per run, in this process too
                raise
            except OSError as exc:
                # The lock dir itself failed us (a full disk, a removed directory, a path
                # too long): say so in words, never as a raw OSError from deep inside.
                raise PrewarmLockError.lock_dir_failed(name, self.lock_dir, exc) from exc
            if template is not None:
                self._configure(tid, request, template)
                self._results[tid] = template
            return template
        finally:
            del self._guard_owners[tid]
            guard.release()

    def _layer(self, layer: Request | Template) -> Template:
        return layer if isinstance(layer, Template) else self.get(layer)

    def _supplied(self, request: Request, supplied: Supplied) -> Template:
        """A directory given from outside: used as it is, for every key, never touched."""
        self.emit(
            TemplateEvent(
                request.name,
                self.worker,
                Outcome.SUPPLIED,
                built_by=f"{supplied.path} (from {supplied.source})",
                pid=os.getpid(),
            )
        )
        return Template(request.name, request.key, supplied.path, None, Origin.SUPPLIED, "supplied")

    def _configure(self, tid: str, request: Request, template: Template) -> None:
        """Run the template's configure hook, once in this process, whoever built it."""
        if request.configure is None:
            return
        try:
            request.configure(template)
        except Exception as exc:
            error = PrewarmConfigureError(request.name, self.worker, exc)
            error.__cause__ = exc
            self._results[tid] = error  # once per process, like a failed build
            raise error from exc

    def _fetch(
        self,
        request: Request,
        tid: str,
        canonical: str,
        layers: dict[str, Template],
        *,
        wait: bool,
        stale_after: float | None = None,
    ) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        for _ in range(MAX_TORN_DOWN):
            try:
                fetch = _Fetch(self, request, tid, canonical, layers, stale_after=stale_after)
                return fetch.run(wait=wait)
            except _TornDown:
                continue  # another run's service went down as we joined: build afresh
        raise PrewarmLockError(
            f"template {request.name!r}: another run sharing the lock dir {self.lock_dir} tore "
            f"its service down each of the {MAX_TORN_DOWN} times this run joined it; run again"
        )

    def _guard(self, tid: str) -> threading.Lock:
        # Threads of one process (an eager background build and a test) serialise here,
        # before the cross-process lock, so a builder never runs concurrently with itself.
        with self._guards_lock:
            return self._guards.setdefault(tid, threading.Lock())


class _TornDown(Exception):
    """The published template's service was torn down by its last user as we joined it."""


MAX_TORN_DOWN = 3  # each needs a concurrent run to build, publish and tear down meanwhile


class _Failed(NamedTuple):
    error: PrewarmBuildError


_Done = _Failed | Meta


class _Fetch:
    """One uncached request for one template in this process, start to end."""

    def __init__(
        self,
        store: TemplateStore,
        request: Request,
        tid: str,
        canonical: str,
        layers: dict[str, Template],
        *,
        stale_after: float | None = None,
    ) -> None:
        self.store = store
        self.layers = layers
        self.request = request
        self.name = request.name
        self.tid = tid
        self.canonical = canonical
        self.layout = store.layout
        self.lock: Lock = store.open_lock(store.layout, tid, request.name, stale_after=stale_after)
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
            if self._done_while_acquiring() is not None:
                return None
        elif done is None:
            done, acquired, waited = self._acquire_or_wait()
        if isinstance(done, _Failed):
            self._event(Outcome.FAILED, waited, built_by=done.error.worker, error=done.error.cause)
            raise done.error
        if done is not None:
            # Waiting means someone built it meanwhile: a worker of this run, or a process
            # of another run sharing the lock dir, which the report names as such.
            origin = Origin.WAITED if waited > 0 else Origin.REUSED
            built_by = done.built_by
            if done.run_id != self.store.run_id:
                built_by = f"{built_by} of run {done.run_id[:8]}"
            joins = self.request.teardown is not None and done.run_id != self.store.run_id
            if joins and not self.store.services().join(self.tid, done):
                raise _TornDown
            self._event(Outcome(origin), waited, built_by=built_by)
            return self._template(done, origin)
        assert acquired is not None
        try:
            return self._build(acquired, waited)
        finally:
            self.lock.release()
            self._empty_trash()
            # A failed attempt was trashed: leave no empty template dir behind. After the
            # release, so no waiter waits for it; a published one, or a successor's build,
            # keeps it (rmdir of a non-empty dir fails).
            with contextlib.suppress(OSError):
                os.rmdir(self.layout.template_dir(self.tid))

    # -- checking and waiting ------------------------------------------------------------------

    def _check_done(self) -> _Done | None:
        failure_file = self.layout.failure_file(self.tid, self.store.run_id)
        # Records are read by path: their directories must not be links planted elsewhere.
        check_dir(failure_file.parent)
        check_dir(self.layout.template_dir(self.tid))
        failure = read_failure(failure_file)
        if failure is not None:
            return _Failed(failure)
        meta = Meta.read(self.layout.meta_file(self.tid))
        if meta is None or not self._build_exists(meta):
            return None
        if self.store.boot_id is None or meta.boot_id != self.store.boot_id:
            # Published in another boot (or restored from a cache): without fsync the data
            # may be torn, so the lock holder verifies it against its digest first.
            return None
        if self.store.rebuild and meta.run_id != self.store.run_id:
            return None
        return meta

    def _build_exists(self, meta: Meta) -> bool:
        """Whether the build meta.json names is there: a real directory of ours.

        Missing (a lease holder that lost its lease after publishing, a hand-made
        deletion) reads as unpublished; a link or another user's directory is refused.
        """
        data = self.layout.data_dir(self.tid, meta.build)
        check_dir(data.parent)
        check_dir(data)
        return os.path.isdir(data)

    def _done_while_acquiring(self) -> _Done | None:
        """Check again once the lock is ours: someone may have finished in between.

        The lock is released if it is done, or if checking fails: nothing stays held
        after an error.
        """
        try:
            done = self._check_done()
        except BaseException:
            self.lock.release()
            raise
        if done is not None:
            self.lock.release()
        return done

    def _acquire_or_wait(self) -> tuple[_Done | None, Acquired | None, float]:
        """``(done, None, waited)`` once the work is done elsewhere, or ``(None, acquired,
        waited)`` once the lock is ours and the work is still to do.

        Raises PrewarmTimeout after the request's timeout, naming the holder.
        """
        __tracebackhide__ = True  # users need the builder's frames, not ours
        lock, store = self.lock, self.store
        start = clock.monotonic()
        deadline = start + self.request.timeout
        every = max(store.notice_every, MIN_NOTICE_EVERY)
        next_notice = start + every
        try:
            while True:
                done = self._check_done()
                if done is not None:
                    return done, None, clock.monotonic() - start
                acquired = lock.try_acquire(store.identity.record(self.name))
                if acquired is not None:
                    done = self._done_while_acquiring()
                    if done is not None:
                        return done, None, clock.monotonic() - start
                    return None, acquired, clock.monotonic() - start
                now = clock.monotonic()
                if now >= deadline:
                    holder = lock.holder()
                    error = PrewarmTimeout.waiting_for(
                        self.name,
                        str(lock.lock_path),
                        now - start,
                        holder.describe(),
                        self._timeout_hint(holder),
                    )
                    self._event(Outcome.TIMEOUT, error.waited, error=str(error).splitlines()[0])
                    raise error
                lock.wait_for_change(min(deadline, next_notice))
                now = clock.monotonic()
                if now >= next_notice:
                    if store.on_notice is not None:
                        store.on_notice(self.name, now - start, lock.holder())
                    # From now, not from the missed due time: a wait that fell behind (a
                    # slow notice, a suspended process) must not print one notice per pass
                    # to catch up, and the next wait_for_change must not be given a time
                    # already past, which would make this loop spin without sleeping.
                    next_notice = clock.monotonic() + every
        finally:
            lock.stop_waiting()

    def _timeout_hint(self, holder: Holder) -> str:
        """The request's timeout advice, with what stopping *this* holder would do."""
        return timeout_hint(self.request.timeout, self.request.timeout_source, holder.takeover)

    # -- building and publishing -------------------------------------------------------------

    def _build(self, acquired: Acquired, waited: float) -> Template:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        recovered = acquired.recovered_from()
        verdict = acquired.previous_verdict
        if recovered and verdict is not None and verdict.state is Liveness.ALIVE:
            recovered += " (lock released without a clean release)"  # pragma: no cover
        previous, reason, reused = self._before_building(waited)
        if reused is not None:
            return reused
        attempt = self.layout.new_build(self.tid)
        data = attempt / DATA_DIR
        data.mkdir(mode=0o700, parents=True)
        instance, teardown = None, self.request.teardown
        if teardown is not None:
            instance = self.store.services().begin(self.request.name, self.tid, data, teardown)

        def failed(exc: BaseException, output: BuildOutput, seconds: float) -> PrewarmBuildError:
            return self._failed(exc, output, attempt, waited, seconds, recovered)

        output = self._capture(data)
        before = _ProcessState()
        # The capture ends after the release, not when the builder returns: ending it waits
        # for its pump threads to drain the pipes, which at -n 8 on two cores cost waiters
        # milliseconds of wake-up. Only our own code runs in between, and it prints nothing.
        try:
            with output:
                value, build_seconds = self._run_builder(data, attempt, instance, output, failed)
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
                    requires={n: t.identity for n, t in self.layers.items()} or None,
                )
                if instance is not None:
                    # Before publishing: a service that runs is torn down even if publishing
                    # fails.
                    self.store.services().built(instance, data, value)
                try:
                    meta = self._publish(attempt, meta, previous)
                except OSError as exc:
                    # Publishing failed in the lock dir itself (a full disk writing
                    # meta.json): the staging goes at once, and the failure is recorded like
                    # a build's, so every other process of the run fails fast instead of
                    # building again.
                    output.stop()
                    self._trash(attempt, now=True)
                    raise failed(exc, output, build_seconds) from None
                # Release before any bookkeeping: waiters are woken by the release, and
                # every microsecond spent here is added to each of their waits.
                self.lock.release(finished=True)
        finally:
            output.discard()  # a no-op after a failure's log was saved
        self._event(
            Outcome.BUILT,
            waited,
            build_seconds=build_seconds,
            built_by=self.store.worker,
            recovered_from=recovered,
            note=reason,
        )
        if self.request.configure is None:
            before.warn_if_changed(self.name)
        return self._template(meta, Origin.BUILT)

    def _run_builder(
        self,
        data: Path,
        attempt: Path,
        instance: Instance | None,
        output: BuildOutput,
        failed: Callable[[BaseException, BuildOutput, float], PrewarmBuildError],
    ) -> tuple[Any, float]:
        """Call the builder, with its output captured; its JSON value and how long it took."""
        __tracebackhide__ = True  # users need the builder's frames, not ours
        from .values import json_round_trip  # before the clock: not the builder's time

        started = clock.monotonic()
        try:
            # The build's stdout and stderr, teed to its log (see capture.py); with a
            # teardown, each service it starts is recorded as it starts.
            with self.store.services().watch(instance):
                returned = self._call_builder(data)
            return json_round_trip(returned, self.name), clock.monotonic() - started
        except Exception as exc:
            build_seconds = clock.monotonic() - started
            output.stop()  # all it wrote drained from the pipes, before its tail is taken
            # On a full disk the staging goes at once, not in the background: the failure
            # record (which lets every other process fail fast) needs the room.
            self._trash(attempt, now=isinstance(exc, OSError) and exc.errno in DISK_FULL)
            # Lease mode: a successor that took over moved our staging away, which is
            # likely why the build failed. Not the builder's fault: record nothing.
            try:
                self.lock.confirm_held("abandoned")
            except PrewarmLockError as lost:
                output.discard()
                raise lost from exc
            # Not chained: the message holds the traceback, the same text every waiter
            # shows, and a chained exception would print it a second time.
            raise failed(exc, output, build_seconds) from None
        except BaseException:
            # Interrupted (Ctrl-C, pytest.exit, a timeout plugin): not the builder's fault,
            # so no failure record; the next run or worker builds afresh.
            output.discard()
            self._trash(attempt)
            raise

    def _before_building(self, waited: float) -> tuple[Meta | None, str | None, Template | None]:
        """``(published, why it is built again, None)``, or the template if it verified.

        We hold the lock. A meta.json that this user did not write stops us before
        anything is swept; builds that meta.json does not name are swept.
        """
        self._check_ours(None)
        previous = self._published()
        reason = None
        if previous is not None:
            reused, reason = self._verify(previous, waited)
            if reused is not None:
                return previous, None, reused
        self._sweep_builds(previous)
        return previous, reason, None

    def _call_builder(self, data: Path) -> Any:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        if self.request.requires:
            return self.request.build(data, dict(self.layers))
        return self.request.build(data)

    def _failed(
        self,
        exc: BaseException,
        output: BuildOutput,
        attempt: Path,
        waited: float,
        build_seconds: float,
        recovered: str | None,
    ) -> PrewarmBuildError:
        """Record the run's failure and its event; the error for the caller to raise."""
        error = self._record_failure(exc, output, attempt)
        self._event(
            Outcome.FAILED,
            waited,
            build_seconds=build_seconds,
            built_by=self.store.worker,
            error=error.cause,
            recovered_from=recovered,
        )
        return error

    def _publish(self, attempt: Path, meta: Meta, previous: Meta | None) -> Meta:
        """Publish the build in ``attempt``, in place: its manifest, then meta.json naming it.

        meta.json is replaced in one rename, so a reader sees the previous template (or
        none) or this one, whole; the build it names never moves afterwards.
        """
        data = attempt / DATA_DIR
        try:
            self._confirm_held(attempt)
            digest = self._record_manifest(attempt)
            meta = meta.replace(build=attempt.name, digest=digest, data_path=str(data))
            self._check_ours(attempt)
            self._confirm_held(attempt)
            write_atomic(self.layout.meta_file(self.tid), meta.to_json())
        except FileNotFoundError:
            # A successor that took over our lease moved our build away.
            self._confirm_held(attempt)
            raise
        if previous is not None and previous.build != meta.build:
            self._trash(self._superseded(previous))  # stale: other boot, or --prewarm-rebuild
        return meta

    def _record_manifest(self, attempt: Path) -> str | None:
        """Write the build's manifest; its digest, or None if the tree cannot be read whole.

        A file the builder made unreadable (or a tree that changes while it is walked, a
        server's) only costs the template its travel between boots: without a digest it
        is built again in another boot, never served unverified. A full disk is still an
        error of the lock dir.
        """
        from .digest import digest_of, manifest

        try:
            tree = manifest(attempt / DATA_DIR)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise
            return None
        write_atomic(self.layout.manifest_file(self.tid, attempt.name), tree)
        return digest_of(tree)

    def _superseded(self, previous: Meta) -> Path:
        # A format-1 template's data sat beside meta.json: only data/ is the old build.
        if previous.build == "":
            return self.layout.template_dir(self.tid) / DATA_DIR
        return self.layout.build_dir(self.tid, previous.build)

    def _published(self) -> Meta | None:
        """What meta.json publishes now, if its build is there (we hold the lock)."""
        meta = Meta.read(self.layout.meta_file(self.tid))
        return meta if meta is not None and self._build_exists(meta) else None

    def _verify(self, previous: Meta, waited: float) -> tuple[Template | None, str | None]:
        """Reuse a template published in another boot if its tree matches its digest.

        ``(template, None)`` when it verified: meta.json is published again for this boot,
        so the other processes reuse it without verifying. ``(None, reason)`` when it must
        be built, with the reason the report gives; ``(None, None)`` for a plain rebuild.
        """
        if self.store.rebuild:
            return None, None
        if self.request.teardown is not None:
            # A service's files may verify, but its server did not survive the boot.
            return None, "a service published in another boot, whose server is not running here"
        if previous.digest is None:
            return None, "published in another boot, without a digest to verify it"
        data = self.layout.data_dir(self.tid, previous.build)
        if previous.data_path is not None and previous.data_path != str(data):
            return None, (
                f"restored to another path (built in {previous.data_path}); a template "
                "may record its own path, so it is built again here"
            )
        from .digest import MAX_MANIFEST_BYTES, digest_of, first_difference, manifest

        started = clock.monotonic()
        raw = read_bounded(self.layout.manifest_file(self.tid, previous.build), MAX_MANIFEST_BYTES)
        recorded = None if raw is None else raw.decode("utf-8", "replace")
        if recorded is None or digest_of(recorded) != previous.digest:
            return None, "restored from another boot, and its manifest does not match its digest"
        current = manifest(data)
        if digest_of(current) != previous.digest:
            difference = first_difference(recorded, current)
            return None, f"restored from another boot, and it did not verify: {difference}"
        meta = previous.replace(boot_id=self.store.boot_id, holder=hold_id(self.lock.held_by()))
        self._check_ours(None)
        write_atomic(self.layout.meta_file(self.tid), meta.to_json())
        self.lock.release(finished=True)
        built_by = meta.built_by
        if meta.run_id != self.store.run_id:
            built_by = f"{built_by} of run {meta.run_id[:8]}"
        self._event(
            Outcome.REUSED,
            waited,
            built_by=built_by,
            note=f"restored from another boot, verified in {clock.monotonic() - started:.2f} s",
        )
        return self._template(meta, Origin.REUSED), None

    def _check_ours(self, attempt: Path | None) -> None:
        """meta.json is replaced only if this user made it, as a file: never another's.

        Refused, the attempt (if any) is discarded: nothing half-made stays behind.
        """
        meta = self.layout.meta_file(self.tid)
        try:
            info = os.lstat(meta)
        except FileNotFoundError:
            return
        if stat.S_ISREG(info.st_mode) and is_mine(info):
            return
        if attempt is not None:
            self._trash(attempt)
        raise PrewarmLockError(
            f"template {self.name!r}: {meta} is {kind_of(info.st_mode)} that this user "
            "did not make (another user's, or not a template); it was neither used nor "
            "touched. Remove it and run again."
        )

    def _confirm_held(self, attempt: Path) -> None:
        try:
            self.lock.confirm_held("discarded")
        except PrewarmLockError:
            self._trash(attempt)
            raise

    def _record_failure(
        self, exc: BaseException, output: BuildOutput, attempt: Path
    ) -> PrewarmBuildError:
        """Record the run's failure: the log first, then the record that names it.

        Every waiter builds its error from the record, so it shows what this process
        shows. The staging paths in it are replaced by BUILD_DIR_MARK: the staging is
        discarded, and no message names a path that is gone.
        """
        from .capture import command_output, tail
        from .failure import (
            MAX_MESSAGE,
            MAX_TRACEBACK,
            builder_traceback,
            clip,
            disk_full_hint,
            safe_str,
            staging_scrubber,
        )
        from .values import type_name

        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            output.discard()  # the record needs the room; the tail stays in the error
        scrub = staging_scrubber(self.layout.root, attempt)
        stderr, stdout = command_output(exc)
        traceback_text = builder_traceback(exc)
        fields: dict[str, Any] = {
            "template": self.name,
            "exc_type": type_name(type(exc)),
            "exc_message": scrub(clip(safe_str(exc), MAX_MESSAGE))
            + disk_full_hint(exc, self.layout.root),
            "traceback_text": scrub(clip(traceback_text, MAX_TRACEBACK)),
            "worker": self.store.worker,
            "pid": os.getpid(),
            "output": scrub(output.tail()),
            "command_stderr": scrub(tail(stderr)),
            "command_stdout": scrub(tail(stdout)),
        }
        log = None
        if traceback_text or not output.empty or stderr.strip() or stdout.strip():
            first = str(PrewarmBuildError(**fields)).split("\n", 1)[0]
            log = self._save_log(output, first, traceback_text, stderr, stdout)
        else:
            output.discard()  # a one-line error (a value that is not JSON) needs no log
        log_path = None if log is None else os.path.abspath(log)  # read from any cwd
        error = PrewarmBuildError(**fields, log_path=log_path)
        path = self.layout.failure_file(self.tid, self.store.run_id)
        make_dir(path.parent)
        write_atomic(path, failure_to_json(error))
        return error

    def _capture(self, data: Path) -> BuildOutput:
        """The build's output: a partial log in failures/, kept only if the build fails."""
        from .capture import BuildOutput

        for stale in self.layout.partial_logs(self.tid):
            with contextlib.suppress(OSError):
                stale.unlink()  # we hold the lock: a dead builder's
        path = self.layout.new_partial_log(self.tid)  # if it cannot be made: no log file
        started = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(clock.wall()))
        header = (
            f"pytest-prewarm: build log of template {self.name!r}, key {self.canonical}\n"
            f"built by {self.store.worker} (pid {os.getpid()}) in run {self.store.run_id}, "
            f"started {started}\n"
            f"build dir: {data} (discarded if the build fails)\n"
            "---- what the build wrote to stdout and stderr ----\n"
        )
        # Streams are redirected in the main thread only: see capture.py for why.
        in_main = threading.current_thread() is threading.main_thread()
        return BuildOutput(path, header, redirect=in_main)

    def _save_log(
        self, output: BuildOutput, first: str, traceback_text: str, stderr: str, stdout: str
    ) -> Path | None:
        """Complete the log with the failure in full; prune this template's old logs."""
        final = self.layout.build_log(self.tid, self.store.run_id)
        lines = ["", "---- end of what the build wrote ----", first]
        if traceback_text:
            lines.append(traceback_text.rstrip("\n"))
        for title, text in (("stderr", stderr), ("stdout", stdout)):
            if text.strip():
                lines += [f"---- {title} of the failed command ----", text.rstrip("\n")]
        try:
            make_dir(final.parent)
        except (OSError, LockDirError):
            output.discard()
            return None
        saved = output.save(final, "\n".join(lines) + "\n")
        if saved is not None:
            # Keep the newest few logs of this template (concurrent runs may share the dir).
            def age(path: Path) -> float:
                try:
                    return os.lstat(path).st_mtime
                except OSError:
                    return 0.0

            older = sorted((p for p in self.layout.build_logs(self.tid) if p != saved), key=age)
            for old in older[: max(len(older) - (LOGS_KEPT - 1), 0)]:
                with contextlib.suppress(OSError):
                    old.unlink()
        return saved

    # -- housekeeping ------------------------------------------------------------------------

    def _sweep_builds(self, published: Meta | None) -> None:
        # We hold the exclusive lock, so any build of this template that meta.json does not
        # name belongs to a builder that died (or a meta.json write it left half-way).
        # Moving it aside is one rename; deleting can wait (facts: 3-4 ms saved).
        root = self.layout.template_dir(self.tid)
        make_dir(root)
        keep = {META_FILE}
        if published is not None:
            keep.add(published.build or DATA_DIR)
        for entry in root.iterdir():
            if entry.name not in keep:
                self._trash(entry)

    def _trash(self, path: Path, *, now: bool = False) -> None:
        target = self.layout.trash_target(path.name)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        if now:
            remove_tree(target)
        else:
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
        note: str | None = None,
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
                note=note,
                key=self.canonical,
            )
        )

    def _template(self, meta: Meta, origin: Origin) -> Template:
        return Template(
            name=meta.name,
            key=self.request.key,
            path=self.layout.data_dir(self.tid, meta.build),
            value=meta.value,
            origin=origin,
            built_by=meta.built_by,
            digest=meta.digest,
        )


LOGS_KEPT = 5  # logs of failed builds kept per template in the lock dir


class _ProcessState:
    """What a builder may change in its own process that other processes never see."""

    def __init__(self) -> None:
        # Only a build in the main thread is judged: while a background (eager) build
        # runs, the main thread runs tests, which may change all of these themselves.
        self.judged = threading.current_thread() is threading.main_thread()
        self.environ = dict(os.environ)
        self.cwd = _cwd()
        self.sys_path = list(sys.path)

    def warn_if_changed(self, template: str) -> None:
        if not self.judged:
            return
        changed = []
        now = dict(os.environ)
        keys = self.environ.keys() | now.keys()
        # PYTEST_CURRENT_TEST and the like are pytest's own, set per test phase.
        names = sorted(
            k for k in keys if self.environ.get(k) != now.get(k) and not k.startswith("PYTEST_")
        )
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            shown = ", ".join(names[:3]) + more
            changed.append(f"environment ({shown})")
        if _cwd() != self.cwd:
            changed.append("working directory")
        if sys.path != self.sys_path:
            changed.append("sys.path")
        if changed:
            warnings.warn(
                PrewarmWarning(
                    f"the builder of template {template!r} changed this process's "
                    f"{' and '.join(changed)}. Only the process that builds sees that; the "
                    "others, and later runs, get the template without it. Do per-process "
                    "set-up in configure=, which runs in every process that gets the "
                    "template (docs/usage.md, 'Build once, configure every process')."
                ),
                stacklevel=2,
            )


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed under us: compare as unknown
        return None
