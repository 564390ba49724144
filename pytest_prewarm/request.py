"""One request for a template, from start to end: check, wait, build, publish, record.

``TemplateStore`` is the per-process front: it caches results, keeps threads of one process
from building the same template twice, and hands each uncached request to ``_Fetch``, which
owns that request alone. Publication is a staging directory filled by the builder, meta.json
written last, then one rename: a reader sees no template or a complete one. A failure is
recorded once per run, so every other request of the run fails fast with its cause.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import clock
from .capture import BuildOutput, command_output, tail
from .events import TemplateEvent
from .exceptions import (
    DISK_FULL,
    LockDirError,
    PrewarmBuildError,
    PrewarmLockError,
    PrewarmTimeout,
    PrewarmUsageError,
    timeout_hint,
)
from .failure import (
    MAX_MESSAGE,
    MAX_TRACEBACK,
    builder_traceback,
    clip,
    disk_full_hint,
    safe_str,
    staging_scrubber,
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
from .trust import check_dir, is_mine, kind_of, make_dir, remove_tree
from .values import json_round_trip, type_name

Builder = Callable[[Path], Any]
Teardown = Callable[[Path, Any], object]  # teardown(path, value), see teardown.py


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
        teardown: Teardown | None = None,
    ) -> Template: ...


@dataclass(frozen=True)
class Request:
    name: str
    build: Builder
    key: Any
    timeout: float
    timeout_source: str = "default"
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
    teardown: Teardown | None = None,
) -> Request:
    """The request for a call ``prewarmed_template(name, build, key=..., timeout=...)``.

    Without ``build``, the builder (and key, and teardown) registered under ``name`` is used.
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
        if teardown is None:
            teardown = registered.teardown
    if not callable(build):
        raise PrewarmUsageError(f"build for template {name!r} is not callable: {build!r}")
    if teardown is not None:
        from .teardown import reference  # only templates with a teardown load it

        reference(teardown, str(name))  # a lambda fails here, not at the run's end
    if timeout is None:
        return Request(name, build, key, default_timeout, default_source, teardown)
    seconds = check_timeout(timeout, name=str(name))
    return Request(name, build, key, seconds, "timeout= in the call", teardown)


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
        # Templates with a teardown (teardown.py): the run's controller, whose end is the
        # run's end, and how long a teardown may take. A worker is told the pid.
        self.controller_pid = os.getpid()
        self.teardown_timeout = 60.0
        self._services: Any = None
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
                raise cached.with_traceback(None)  # not one more frame per re-raise
            if cached is not None:
                return cached
            try:
                template = self._fetch(request, tid, canonical, wait=wait)
            except PrewarmBuildError as exc:
                self._results[tid] = exc  # one attempt per run, in this process too
                raise
            except OSError as exc:
                # The lock dir itself failed us (a full disk, a removed directory, a path
                # too long): say so in words, never as a raw OSError from deep inside.
                raise PrewarmLockError.lock_dir_failed(name, self.lock_dir, exc) from exc
            if template is not None:
                self._results[tid] = template
            return template
        finally:
            del self._guard_owners[tid]
            guard.release()

    def _fetch(self, request: Request, tid: str, canonical: str, *, wait: bool) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        for _ in range(MAX_TORN_DOWN):
            try:
                return _Fetch(self, request, tid, canonical).run(wait=wait)
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
            # The attempt was published (renamed away) or trashed: leave no empty staging
            # dir behind. After the release, so no waiter waits for it; a successor that
            # already made it again keeps it (rmdir of a non-empty dir fails).
            with contextlib.suppress(OSError):
                os.rmdir(self.layout.staging_root(self.tid))

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
        if meta is None:
            return None
        if self.store.boot_id is None or meta.boot_id != self.store.boot_id:
            # Published in another boot: without fsync the data may be torn, so rebuild.
            return None
        if self.store.rebuild and meta.run_id != self.store.run_id:
            return None
        return meta

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
        next_notice = start + store.notice_every
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
        instance, teardown = None, self.request.teardown
        if teardown is not None:
            instance = self.store.services().begin(self.request.name, self.tid, data, teardown)
        started = clock.monotonic()
        output = self._capture(data)
        try:
            # The build's stdout and stderr, teed to its log (see capture.py); with a
            # teardown, each service it starts is recorded as it starts.
            with output, self.store.services().watch(instance):
                returned = self.request.build(data)
            value = json_round_trip(
                returned, self.name, (str(data), str(self.layout.data_dir(self.tid)))
            )
            output.discard()
        except Exception as exc:
            build_seconds = clock.monotonic() - started
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
            raise self._failed(exc, output, attempt, waited, build_seconds, recovered) from None
        except BaseException:
            # Interrupted (Ctrl-C, pytest.exit, a timeout plugin): not the builder's fault,
            # so no failure record; the next run or worker builds afresh.
            output.discard()
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
        if instance is not None:
            # Before publishing: a service that runs is torn down even if publishing fails.
            self.store.services().built(instance, self.layout.data_dir(self.tid), value)
        try:
            self._publish(attempt, meta)
        except OSError as exc:
            # Publishing failed in the lock dir itself (a full disk writing meta.json): the
            # staging goes at once, and the failure is recorded like a build's, so every
            # other process of the run fails fast instead of building again.
            self._trash(attempt, now=True)
            no_output = BuildOutput(None, "", redirect=False)
            raise self._failed(exc, no_output, attempt, waited, build_seconds, recovered) from None
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
        if os.path.lexists(published):
            try:
                self._check_ours(published)
            except PrewarmLockError:
                self._trash(attempt)
                raise
            self._trash(published)  # stale: other boot, or --prewarm-rebuild
        os.rename(attempt, published)

    def _check_ours(self, published: Path) -> None:
        """A stale template is moved aside only if this user made it: never another's."""
        info = os.lstat(published)
        meta = self.layout.meta_file(self.tid)
        meta_info = os.lstat(meta) if os.path.lexists(meta) else info
        if stat.S_ISDIR(info.st_mode) and is_mine(info) and is_mine(meta_info):
            return
        raise PrewarmLockError(
            f"template {self.name!r}: {published} is {kind_of(info.st_mode)} that this user "
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

    def _sweep_staging(self) -> None:
        # We hold the exclusive lock, so any staging of this template belongs to a builder
        # that died. Moving it aside is one rename; deleting can wait (facts: 3-4 ms saved).
        staging_root = self.layout.staging_root(self.tid)
        make_dir(staging_root)
        for orphan in staging_root.iterdir():
            self._trash(orphan)

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


LOGS_KEPT = 5  # logs of failed builds kept per template in the lock dir
