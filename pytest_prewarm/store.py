"""Build each template once: paths, staging, atomic publication and failure records.

Layout inside the lock dir (every path below is derived from it; nothing is written
anywhere else)::

    locks/<id>.lock          permanent flock file, never written or deleted
    locks/<id>.owner.json    who holds (or last held) the lock
    staging/<id>/<attempt>/  a build in progress: data/ is what the builder fills
    templates/<id>/          a published template: data/ plus meta.json
    failures/<id>/<run>.json a failed build, so the rest of that run fails fast
    trash/                   staging and old templates moved aside, deleted in background

``<id>`` is the safe file stem of the name plus a digest of the key, so a different key
is a different template with its own lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import clock
from .config import timeout_hint
from .events import BUILT, FAILED, REUSED, TIMEOUT, WAITED, TemplateEvent
from .exceptions import PrewarmBuildError, PrewarmLockError, PrewarmTimeout, PrewarmUsageError
from .liveness import Liveness, boot_id, own_record
from .lock import Acquired, FlockLock, Holder, Lock, acquire_or_wait
from .names import canonical_key, check_name, file_stem, key_digest
from .owner import OwnerRecord, write_atomic

META_FORMAT = 1
DATA_DIR = "data"
META_FILE = "meta.json"


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
            f"origin={self.origin!r}, built_by={self.built_by!r})"
        )


@dataclass(frozen=True)
class _Failure:
    error: PrewarmBuildError


@dataclass(frozen=True)
class _Published:
    meta: dict[str, Any]


@dataclass(frozen=True)
class Request:
    name: str
    build: Callable[[Path], Any]
    key: Any
    timeout: float
    timeout_source: str = "default"

    @property
    def timeout_hint(self) -> str:
        return timeout_hint(self.timeout, self.timeout_source)


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
        on_notice: Callable[[str, float, Holder], None] | None = None,
        lock_mode: str = "flock",
        stale_after: float = 60.0,
        heartbeat: float = 2.0,
    ) -> None:
        self.lock_mode = lock_mode
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.lock_dir = lock_dir
        self.run_id = run_id
        self.worker = worker
        self.rebuild = rebuild
        self.notice_every = notice_every
        self.on_notice = on_notice
        self.events: list[TemplateEvent] = []
        self.on_event: Callable[[TemplateEvent], None] | None = None
        self._results: dict[str, Template | PrewarmBuildError] = {}
        self._guards: dict[str, threading.Lock] = {}
        self._guards_lock = threading.Lock()
        self._guard_owners: dict[str, int] = {}
        self._to_delete: list[Path] = []
        self._identity: OwnerRecord | None = None  # tid -> thread ident holding its guard
        self._boot_id = boot_id()
        for sub in ("locks", "staging", "templates", "failures", "trash"):
            (lock_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        # Background deletions die with their process; finish any that were cut short.
        for leftover in (lock_dir / "trash").iterdir():
            _delete_in_background(leftover)

    # -- paths -----------------------------------------------------------------------------

    def template_id(self, name: str, canonical: str) -> str:
        return f"{file_stem(name)}.{key_digest(canonical)}"

    def published_dir(self, tid: str) -> Path:
        return self.lock_dir / "templates" / tid

    def forget_run(self) -> None:
        """Remove this run's failure records; a later run must try again anyway."""
        pattern = f"*/{file_stem(self.run_id)}.json"
        for path in (self.lock_dir / "failures").glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()

    def _failure_path(self, tid: str) -> Path:
        return self.lock_dir / "failures" / tid / f"{file_stem(self.run_id)}.json"

    # -- public ----------------------------------------------------------------------------

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

    def _get(self, request: Request, *, wait: bool) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        name = check_name(request.name)
        canonical = canonical_key(request.key, name=name)
        tid = self.template_id(name, canonical)
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
            raise PrewarmTimeout(
                f"timed out after {request.timeout:g} s waiting for template {name!r}, "
                f"which another thread of this process ({self.worker}, pid {os.getpid()}) "
                f"is building. {request.timeout_hint}",
                name,
                str(self.lock_dir / "locks" / f"{tid}.lock"),
                request.timeout,
            )
        self._guard_owners[tid] = me
        try:
            cached = self._results.get(tid)
            if isinstance(cached, PrewarmBuildError):
                raise cached
            if cached is not None:
                return cached
            try:
                template = self._get_uncached(request, tid, wait=wait)
            except PrewarmBuildError as exc:
                self._results[tid] = exc  # one attempt per run, in this process too
                raise
            if template is not None:
                self._results[tid] = template
            return template
        finally:
            del self._guard_owners[tid]
            guard.release()

    # -- internals -------------------------------------------------------------------------

    def _guard(self, tid: str) -> threading.Lock:
        # Threads of one process (an eager background build and a test) serialise here,
        # before the cross-process lock, so a builder never runs concurrently with itself.
        with self._guards_lock:
            return self._guards.setdefault(tid, threading.Lock())

    def _emit(self, event: TemplateEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def _check_done(self, tid: str) -> _Failure | _Published | None:
        failure = _read_json(self._failure_path(tid))
        if failure is not None:
            return _Failure(_build_error_from(failure))
        meta = _read_json(self.published_dir(tid) / META_FILE)
        if meta is None or meta.get("format") != META_FORMAT:
            return None
        if self._boot_id is None or meta.get("boot_id") != self._boot_id:
            # Published in another boot: without fsync the data may be torn, so rebuild.
            return None
        if self.rebuild and meta.get("run_id") != self.run_id:
            return None
        return _Published(meta)

    def _make_record(self, name: str) -> OwnerRecord:
        # Who we are does not change within a process (a forked child has another pid and
        # computes its own), so it is read once, not on every attempt of a takeover.
        if self._identity is None or self._identity.pid != os.getpid():
            self._identity = own_record(self.worker, self.run_id)
        return replace(self._identity, started_at=clock.wall(), template=name)

    def _get_uncached(self, request: Request, tid: str, *, wait: bool) -> Template | None:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        name = request.name
        lock = self._make_lock(tid, name)
        # Fast path without touching the lock: already published or failed in this run.
        done: _Failure | _Published | None = self._check_done(tid)
        waited = 0.0
        acquired: Acquired | None = None
        if done is None and not wait:
            acquired = lock.try_acquire(self._make_record(name))
            if acquired is None:
                return None
            done = self._check_done(tid)  # finished between our check and our lock?
            if done is not None:
                lock.release()
                return None
        elif done is None:
            try:
                done, acquired, waited = acquire_or_wait(
                    lock,
                    lambda: self._check_done(tid),
                    lambda: self._make_record(name),
                    timeout=request.timeout,
                    timeout_hint=request.timeout_hint,
                    notice_every=self.notice_every,
                    on_notice=self._notice_for(name),
                )
            except PrewarmTimeout as exc:
                self._emit(
                    TemplateEvent(
                        name,
                        self.worker,
                        TIMEOUT,
                        exc.waited,
                        pid=os.getpid(),
                        error=str(exc).splitlines()[0],
                    )
                )
                raise
        if isinstance(done, _Failure):
            self._emit(
                TemplateEvent(
                    name,
                    self.worker,
                    FAILED,
                    waited,
                    built_by=done.error.worker,
                    error=f"{done.error.exc_type}: {done.error.exc_message}",
                    pid=os.getpid(),
                )
            )
            raise done.error
        if isinstance(done, _Published):
            origin = WAITED if waited > 0 and done.meta.get("run_id") == self.run_id else REUSED
            self._emit(
                TemplateEvent(
                    name,
                    self.worker,
                    origin,
                    waited,
                    built_by=str(done.meta.get("built_by")),
                    pid=os.getpid(),
                )
            )
            return self._template_from(tid, request.key, done.meta, origin)
        assert acquired is not None
        try:
            return self._build(request, tid, lock, acquired, waited)
        finally:
            lock.release()
            self._empty_trash()

    def _make_lock(self, tid: str, name: str) -> Lock:
        locks = self.lock_dir / "locks"
        if self.lock_mode == "lease":
            from .lease import LeaseLock  # most runs use flock; skip its import there

            return LeaseLock(
                locks / f"{tid}.lease",
                name,
                stale_after=self.stale_after,
                heartbeat=self.heartbeat,
            )
        return FlockLock(
            locks / f"{tid}.lock",
            locks / f"{tid}.owner.json",
            name,
            finished_by=lambda record: self._published_by(tid, record),
        )

    def _published_by(self, tid: str, record: OwnerRecord) -> bool:
        meta = _read_json(self.published_dir(tid) / META_FILE)
        return meta is not None and meta.get("holder") == _holder_id(record)

    def _notice_for(self, name: str) -> Callable[[float, Holder], None] | None:
        if self.on_notice is None:
            return None
        on_notice = self.on_notice
        return lambda waited, holder: on_notice(name, waited, holder)

    def _template_from(self, tid: str, key: Any, meta: dict[str, Any], origin: str) -> Template:
        return Template(
            name=str(meta.get("name")),
            key=key,
            path=self.published_dir(tid) / DATA_DIR,
            value=meta.get("value"),
            origin=origin,
            built_by=str(meta.get("built_by")),
        )

    def _sweep_staging(self, tid: str) -> None:
        # We hold the exclusive lock, so any staging of this template belongs to a builder
        # that died. Moving it aside is one rename; deleting can wait (facts: 3-4 ms saved).
        staging_root = self.lock_dir / "staging" / tid
        staging_root.mkdir(mode=0o700, exist_ok=True)
        for orphan in staging_root.iterdir():
            self._trash(orphan)

    def _trash(self, path: Path) -> None:
        target = self.lock_dir / "trash" / f"{path.name}.{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, target)
            self._to_delete.append(target)

    def _empty_trash(self) -> None:
        # Deleting is deferred until the lock is released: a deleting thread competes with
        # the builder for the GIL, which delayed takeovers by milliseconds.
        while self._to_delete:
            _delete_in_background(self._to_delete.pop())

    def _build(
        self, request: Request, tid: str, lock: Lock, acquired: Acquired, waited: float
    ) -> Template:
        __tracebackhide__ = True  # users need the builder's frames, not ours
        name = request.name
        recovered = None
        if acquired.took_over and acquired.previous is not None:
            verdict = acquired.previous_verdict
            recovered = (
                f"{acquired.previous.worker}, pid {acquired.previous.pid}: {verdict}"
                if verdict is not None
                else f"{acquired.previous.worker}, pid {acquired.previous.pid}"
            )
            if verdict is not None and verdict.state is Liveness.ALIVE:  # pragma: no cover
                recovered += " (lock released without a clean release)"
        self._sweep_staging(tid)
        attempt = self.lock_dir / "staging" / tid / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        data = attempt / DATA_DIR
        data.mkdir(mode=0o700, parents=True)
        started = clock.monotonic()
        try:
            returned = request.build(data)
            value = _json_round_trip(returned, name)
        except Exception as exc:
            build_seconds = clock.monotonic() - started
            self._trash(attempt)
            lost = lock.lost()
            if lost is not None:
                # Lease mode: a successor took over and moved our staging away, which is
                # likely why the build failed. Not the builder's fault: record nothing.
                raise PrewarmLockError(
                    f"template {name!r}: lost the lease while building ({lost}); "
                    "the build was abandoned. Raise --prewarm-stale-after if builds stall "
                    "for longer than it."
                ) from exc
            error = self._record_failure(tid, name, exc)
            self._emit(
                TemplateEvent(
                    name,
                    self.worker,
                    FAILED,
                    waited,
                    build_seconds,
                    self.worker,
                    error=f"{error.exc_type}: {error.exc_message}",
                    recovered_from=recovered,
                    pid=os.getpid(),
                )
            )
            raise error from exc
        except BaseException:
            # Interrupted (Ctrl-C, pytest.exit, a timeout plugin): not the builder's fault,
            # so no failure record; the next run or worker builds afresh.
            self._trash(attempt)
            raise
        build_seconds = clock.monotonic() - started
        meta = {
            "format": META_FORMAT,
            "name": name,
            "key": canonical_key(request.key, name=name),
            "value": value,
            "built_by": self.worker,
            "pid": os.getpid(),
            "run_id": self.run_id,
            "boot_id": self._boot_id,
            "build_seconds": build_seconds,
            "published_at": clock.wall(),
            # Which hold published it: the next holder then knows this one finished.
            "holder": _holder_id(lock.held_by()),
        }
        # The marker goes in last, then one rename makes the whole directory visible:
        # a reader sees no template or a complete one, never a partial one.
        try:
            self._ensure_held(lock, name, attempt)
            (attempt / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
            self._ensure_held(lock, name, attempt)
        except FileNotFoundError:
            # A successor that took over our lease moved our staging away.
            self._ensure_held(lock, name, attempt)
            raise
        published = self.published_dir(tid)
        if published.exists():
            self._trash(published)  # stale: other boot, or --prewarm-rebuild
        os.rename(attempt, published)
        # Release before any bookkeeping: waiters are woken by the release, and every
        # microsecond spent here is added to each of their waits.
        lock.release(published=True)
        self._emit(
            TemplateEvent(
                name,
                self.worker,
                BUILT,
                waited,
                build_seconds,
                self.worker,
                recovered_from=recovered,
                pid=os.getpid(),
            )
        )
        return self._template_from(tid, request.key, meta, BUILT)

    def _ensure_held(self, lock: Lock, name: str, attempt: Path) -> None:
        lost = lock.lost()
        if lost is not None:
            # Lease mode only: we were judged stale and someone else took over. Our build
            # may be fine, but publishing now could clobber theirs; theirs wins.
            self._trash(attempt)
            raise PrewarmLockError(
                f"template {name!r}: lost the lease while building ({lost}); the build was "
                "discarded. Raise --prewarm-stale-after if builds stall for longer than it."
            )

    def _record_failure(self, tid: str, name: str, exc: BaseException) -> PrewarmBuildError:
        error = PrewarmBuildError(
            template=name,
            exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            exc_message=str(exc),
            traceback_text=_builder_traceback(exc),
            worker=self.worker,
            pid=os.getpid(),
        )
        path = self._failure_path(tid)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(
            path,
            json.dumps(
                {
                    "template": error.template,
                    "exc_type": error.exc_type,
                    "exc_message": error.exc_message,
                    "traceback": error.traceback_text,
                    "worker": error.worker,
                    "pid": error.pid,
                }
            ),
        )
        return error


def _holder_id(record: OwnerRecord | None) -> list[Any] | None:
    return None if record is None else [record.pid, record.started_at]


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _build_error_from(data: dict[str, Any]) -> PrewarmBuildError:
    def text(field: str) -> str:
        value = data.get(field)
        return value if isinstance(value, str) else "<unrecorded>"

    pid = data.get("pid")
    return PrewarmBuildError(
        template=text("template"),
        exc_type=text("exc_type"),
        exc_message=text("exc_message"),
        traceback_text=text("traceback"),
        worker=text("worker"),
        pid=pid if isinstance(pid, int) else 0,
    )


def _delete_in_background(path: Path) -> None:
    thread = threading.Thread(
        target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, daemon=True
    )
    thread.start()


def check_timeout(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PrewarmUsageError(
            f"timeout {value!r} for template {name!r} must be a positive number of seconds"
        )
    return float(value)
