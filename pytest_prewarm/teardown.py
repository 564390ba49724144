"""Teardowns of built templates: the record a build leaves, the runs using it, one teardown.

A template built with ``teardown=`` (a running service, usually) leaves an instance record
in ``services/<id>/``: where the template is, its value, and how to find the teardown by
name (module, qualified name, source file, the builder's ``sys.path``). Nothing of the
builder's process is needed afterwards: whoever ends the run (the controller at its end,
or the reaper once the run was killed) reads the record, imports the function and calls
``teardown(path, value)``.

Each run that uses an instance is a user of it (``<inst>.users/<run>.json``, the owner
record of the run's controller). A run that ends leaves; the last live user tears the
instance down. Exactly once: the one who creates ``<inst>.claim`` (O_EXCL) runs the
teardown, and the record goes when it returns. A claim whose claimer is dead was cut
short and is taken over.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import clock
from .exceptions import PrewarmUsageError
from .failure import MAX_MESSAGE, builder_traceback, clip, safe_str
from .files import O_CLOEXEC, O_NOFOLLOW, read_json_object, write_atomic
from .layout import Layout
from .liveness import Liveness, classify
from .names import file_stem
from .owner import OwnerRecord, read_record
from .records import Meta
from .trust import make_dir, remove_tree

RECORD_FORMAT = 1


Teardown = Callable[[Path, Any], object]

OK, FAILED, TIMEOUT = "ok", "failed", "timeout"


class TeardownError(Exception):
    """A teardown could not be found again by its recorded name."""


@dataclass(frozen=True)
class TeardownRef:
    """How another process finds a teardown function: by module and qualified name."""

    module: str
    qualname: str
    file: str | None

    def describe(self) -> str:
        return f"{self.module}.{self.qualname}"


FIX = (
    "define it with def at module level (in a conftest.py or a module of yours), for example "
    "def stop_db(path, value): ...; it may run in another process after the run ends"
)


def _lookup(module: ModuleType | None, qualname: str) -> object:
    found: object = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def reference(func: object, template: str) -> TeardownRef:
    """The name by which ``func`` is found again; a clear error if it cannot be."""
    if not callable(func):
        raise PrewarmUsageError(f"teardown for template {template!r} is not callable: {func!r}")
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise PrewarmUsageError(
            f"teardown {func!r} for template {template!r} has no module and name; {FIX}"
        )
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise PrewarmUsageError(
            f"teardown {module}.{qualname} for template {template!r} is a lambda or a "
            f"function defined inside another one, which no other process can import; {FIX}"
        )
    if _lookup(sys.modules.get(module), qualname) is not func:
        raise PrewarmUsageError(
            f"teardown {module}.{qualname} for template {template!r} is not what that name "
            f"refers to (a bound method, a partial or a decorated copy?); {FIX}"
        )
    try:
        file = inspect.getsourcefile(func)
    except TypeError:
        file = None
    return TeardownRef(module, qualname, file)


def resolve(ref: TeardownRef, sys_path: list[str]) -> Teardown:
    """The function ``ref`` names: already imported here, imported by name, or from its file."""
    module = sys.modules.get(ref.module)
    if module is None:
        module = _import(ref, sys_path)
    found = _lookup(module, ref.qualname)
    if not callable(found):
        raise TeardownError(f"{ref.describe()} was not found in module {ref.module}")
    return found


def _import(ref: TeardownRef, sys_path: list[str]) -> ModuleType:
    # The builder's sys.path (pytest's rootdir and test dirs) goes after ours, so nothing
    # already importable here is shadowed by it.
    sys.path.extend(p for p in sys_path if p not in sys.path)
    try:
        return importlib.import_module(ref.module)
    except ImportError as exc:
        if ref.file is None or not os.path.isfile(ref.file):
            raise TeardownError(f"cannot import {ref.module} for {ref.describe()}: {exc}") from exc
    # pytest's importlib import mode gives modules names that no sys.path entry resolves.
    spec = importlib.util.spec_from_file_location(ref.module, ref.file)
    if spec is None or spec.loader is None:
        raise TeardownError(f"cannot load {ref.file} for {ref.describe()}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[ref.module] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[ref.module]
        raise TeardownError(
            f"importing {ref.file} for {ref.describe()} failed: {safe_str(exc)}"
        ) from exc
    return module


@dataclass
class Instance:
    """One build of a template with a teardown: what the teardown needs, and who built it.

    Recorded when the build starts (``built`` false, no value yet); ``started`` collects
    the services the builder started with ``services.start``, so that a build that never
    returned still has them stopped. ``built`` once the builder returned its value.
    """

    template: str
    tid: str
    instance: str
    run_id: str
    built_by: str
    pid: int
    path: str
    value: Any
    teardown: TeardownRef
    sys_path: list[str]
    built: bool = False
    started: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "template": self.template,
                "tid": self.tid,
                "instance": self.instance,
                "run_id": self.run_id,
                "built_by": self.built_by,
                "pid": self.pid,
                "path": self.path,
                "value": self.value,
                "teardown": {
                    "module": self.teardown.module,
                    "qualname": self.teardown.qualname,
                    "file": self.teardown.file,
                },
                "sys_path": self.sys_path,
                "built": self.built,
                "started": self.started,
            }
        )

    @classmethod
    def read(cls, path: Path) -> Instance | None:
        data = read_json_object(path)
        if data is None or data.get("format") != RECORD_FORMAT:
            return None
        texts = [data.get(f) for f in ("template", "tid", "instance", "run_id", "built_by", "path")]
        ref, pid, sys_path = data.get("teardown"), data.get("pid"), data.get("sys_path")
        built, started = data.get("built"), data.get("started")
        if not all(isinstance(t, str) for t in texts) or type(pid) is not int:
            return None
        if not isinstance(ref, dict) or not isinstance(sys_path, list):
            return None
        if not isinstance(built, bool) or not isinstance(started, list):
            return None
        module, qualname, file = ref.get("module"), ref.get("qualname"), ref.get("file")
        if not (isinstance(module, str) and isinstance(qualname, str)):
            return None
        template, tid, instance, run_id, built_by, where = (str(t) for t in texts)
        return cls(
            template=template,
            tid=tid,
            instance=instance,
            run_id=run_id,
            built_by=built_by,
            pid=pid,
            path=where,
            value=data.get("value"),
            teardown=TeardownRef(module, qualname, file if isinstance(file, str) else None),
            sys_path=[p for p in sys_path if isinstance(p, str)],
            built=built,
            started=[v for v in started if isinstance(v, dict)],
        )


def record_building(
    layout: Layout,
    *,
    template: str,
    tid: str,
    run_id: str,
    worker: str,
    path: Path,
    ref: TeardownRef,
    controller: OwnerRecord,
) -> Instance:
    """Record a build of a template with a teardown as it starts; its run is the first user."""
    make_dir(layout.services_root)
    make_dir(layout.service_dir(tid))
    instance = Instance(
        template=template,
        tid=tid,
        instance=f"{file_stem(run_id)[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        run_id=run_id,
        built_by=worker,
        pid=os.getpid(),
        path=str(path),
        value=None,
        teardown=ref,
        sys_path=list(sys.path),
    )
    # The user entry first: a record without a user would be torn down by any run's end.
    _join(layout, instance, controller)
    _write(layout, instance)
    return instance


def add_started(layout: Layout, instance: Instance, service: dict[str, Any]) -> None:
    """The builder started ``service`` (``services.start``'s value): stopped if it dies."""
    instance.started.append(service)
    _write(layout, instance)


def record_built(layout: Layout, instance: Instance, path: Path, value: Any) -> None:
    """The builder returned ``value``: from now on the teardown gets it."""
    instance.built, instance.value, instance.path = True, value, str(path)
    _write(layout, instance)


def _write(layout: Layout, instance: Instance) -> None:
    write_atomic(layout.service_record(instance.tid, instance.instance), instance.to_json())


def join(
    layout: Layout, tid: str, controller: OwnerRecord, meta: Meta, timeout: float
) -> bool | None:
    """Make this run a user of the instance that published ``meta`` (another run's build).

    True: joined, the service stays up until this run leaves. False: its last user tore
    it down meanwhile; ask again (the template is unpublished, or about to be). None: no
    instance published it (built without a teardown): nothing to join.
    """
    for path in sorted(layout.service_dir(tid).glob("*.json")):
        instance = Instance.read(path)
        if instance is None or (instance.run_id, instance.pid) != (meta.run_id, meta.pid):
            continue
        _join(layout, instance, controller)
        # Its last user may have claimed it just before we joined: that one then either
        # sees us and backs off (the claim goes, the record stays) or tears it down (both
        # go). Which, is known within the teardown's time.
        claim = layout.service_claim(tid, instance.instance)
        deadline = clock.monotonic() + timeout
        while os.path.lexists(claim) and os.path.lexists(path) and clock.monotonic() < deadline:
            time.sleep(0.01)  # the claimer leaves no kernel object to wait on
        if os.path.lexists(path) and not os.path.lexists(claim):
            return True
        _unlink(layout.service_user(tid, instance.instance, controller.run_id))
        return False
    # No record: none ever was, or it was torn down after we read meta.json. A teardown
    # unpublishes before it removes the record, so meta.json tells the two apart.
    now = Meta.read(layout.meta_file(tid))
    if now is None or (now.run_id, now.pid, now.published_at) != (
        meta.run_id,
        meta.pid,
        meta.published_at,
    ):
        return False
    return None


def _join(layout: Layout, instance: Instance, controller: OwnerRecord) -> None:
    users = layout.service_users(instance.tid, instance.instance)
    make_dir(users)
    write_atomic(
        layout.service_user(instance.tid, instance.instance, controller.run_id),
        controller.to_json(),
    )


@dataclass(frozen=True)
class Result:
    """One teardown's outcome: ``ok``, ``failed`` (it raised) or ``timeout`` (it hung)."""

    template: str
    outcome: str
    seconds: float
    run_by: str
    built_by: str
    error: str | None = None
    unfinished: bool = False  # the build never returned: only its started services stopped

    def to_dict(self) -> dict[str, Any]:
        return {
            "unfinished": self.unfinished,
            "template": self.template,
            "outcome": self.outcome,
            "seconds": self.seconds,
            "run_by": self.run_by,
            "built_by": self.built_by,
            "error": self.error,
        }


def finish(layout: Layout, run_id: str, *, runner: OwnerRecord, timeout: float) -> list[Result]:
    """The end of run ``run_id``: leave every instance it used, tear down those it was last of.

    Cheap when no service was built: ``services/`` does not exist, and the glob finds nothing.
    """
    results = []
    for path in layout.service_records():
        instance = Instance.read(path)
        if instance is None:
            continue
        mine = layout.service_user(instance.tid, instance.instance, run_id)
        used = _unlink(mine)
        if not used and instance.run_id != run_id:
            continue  # another run's, which this run never used
        if _live_users(layout, instance) or not _claim(layout, instance, runner):
            continue
        if _live_users(layout, instance):
            # A run joined between the check and the claim: it is now the last user.
            _unlink(layout.service_claim(instance.tid, instance.instance))
            continue
        results.append(_tear_down(layout, instance, runner.worker, timeout))
    return results


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _live_users(layout: Layout, instance: Instance) -> list[OwnerRecord]:
    """Users whose run may still be going: a dead controller's entry is removed."""
    users = layout.service_users(instance.tid, instance.instance)
    live = []
    for path in sorted(users.glob("*.json")):
        record = read_record(path)
        if record is None:
            continue  # torn or foreign: it proves no user
        if classify(record).state is Liveness.DEAD:
            _unlink(path)
        else:
            live.append(record)
    return live


def _claim(layout: Layout, instance: Instance, runner: OwnerRecord) -> bool:
    """Whether this process now runs the instance's teardown (and nobody else does)."""
    path = layout.service_claim(instance.tid, instance.instance)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        except FileExistsError:
            holder = read_record(path)
            if holder is not None and classify(holder).state is not Liveness.DEAD:
                return False
            # Its claimer died before finishing (or the claim is torn): take it over.
            _unlink(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(runner.to_json())
        return True
    return False


def _tear_down(layout: Layout, instance: Instance, run_by: str, timeout: float) -> Result:
    started = clock.monotonic()
    # Unpublished first: a run that reads meta.json from now on builds afresh instead of
    # joining a service on its way down (see ``join``).
    _unpublish(layout, instance)
    if not instance.built:
        # No value: the teardown cannot be called. What the helper started is known.
        outcome, error = call(_stop_all, Path(instance.path), instance.started, timeout)
    else:
        try:
            func = resolve(instance.teardown, instance.sys_path)
        except TeardownError as exc:
            outcome, error = FAILED, str(exc) or None
        else:
            outcome, error = call(func, Path(instance.path), instance.value, timeout)
    seconds = clock.monotonic() - started
    # Attempted once, whatever came of it: the record goes.
    remove_tree(layout.service_users(instance.tid, instance.instance))
    _unlink(layout.service_record(instance.tid, instance.instance))
    _unlink(layout.service_claim(instance.tid, instance.instance))
    with contextlib.suppress(OSError):
        os.rmdir(layout.service_dir(instance.tid))
    unfinished = not instance.built
    return Result(instance.template, outcome, seconds, run_by, instance.built_by, error, unfinished)


def _stop_all(path: Path, started: list[dict[str, Any]]) -> None:
    from . import services

    for value in started:
        services.stop(value)


def _unpublish(layout: Layout, instance: Instance) -> None:
    """Unpublish the build this instance made, unless a later build replaced it.

    meta.json goes first (one unlink: readers then see no template), then the build's
    directory. Other builds in the template's directory (a build in progress of another
    run) are not touched.
    """
    meta = Meta.read(layout.meta_file(instance.tid))
    if meta is None or meta.run_id != instance.run_id or meta.pid != instance.pid:
        return
    build = layout.build_dir(instance.tid, meta.build)
    if meta.build == "" or Path(instance.path).parent != build:
        return  # not the build this instance made (a format-1 record is never ours)
    try:
        os.unlink(layout.meta_file(instance.tid))
        target = layout.trash_target(build.name)
        os.rename(build, target)
    except OSError:
        return
    remove_tree(target)
    with contextlib.suppress(OSError):  # left empty; another run's build in it keeps it
        os.rmdir(layout.template_dir(instance.tid))


def call(func: Teardown, path: Path, value: Any, timeout: float) -> tuple[str, str | None]:
    """Call ``func(path, value)`` for at most ``timeout`` s: (outcome, error text or None).

    In a daemon thread: a hung teardown cannot be stopped from Python, only left behind,
    and it must not keep the process from ending.
    """
    box: list[BaseException | None] = []

    def target() -> None:
        try:
            func(path, value)
        except BaseException as exc:  # reported, never raised here: the run is ending
            box.append(exc)
        else:
            box.append(None)

    thread = threading.Thread(target=target, name="prewarm-teardown", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        return TIMEOUT, f"still running after {timeout:g} s (see --prewarm-teardown-timeout)"
    exc = box[0]
    if exc is None:
        return OK, None
    text = builder_traceback(exc) or f"{type(exc).__name__}: {safe_str(exc)}"
    return FAILED, clip(text.rstrip("\n"), MAX_MESSAGE)
