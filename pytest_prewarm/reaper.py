"""The watcher that tears a killed run's services down, from outside the run's process group;
and ``RunServices``, a process's side of its run's services, which starts the watcher.

The first process of a run to build (or join) a template with a teardown starts one
watcher for the run: ``python -m pytest_prewarm.reaper``, in a session of its own, so a
SIGKILL of the run's process group or a Ctrl-C in its terminal does not reach it. It waits
for the run's controller to exit and learns of it from the kernel: a pidfd on Linux
(readable once the process has exited), kqueue's NOTE_EXIT on macOS and the BSDs, a
process handle elsewhere (psutil's wait, which polls where the platform offers nothing
better). Then it ends the run as the controller would have (``teardown.finish``) and
exits. After a normal end the controller has done that already, and it finds nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import services
from .files import O_CLOEXEC, O_NOFOLLOW, write_atomic
from .layout import Layout
from .liveness import Liveness, classify, own_record
from .owner import OwnerRecord, parse_record
from .records import Meta
from .teardown import (
    OK,
    Instance,
    Teardown,
    add_started,
    finish,
    join,
    record_building,
    record_built,
    reference,
)
from .trust import make_dir


class RunServices:
    """One process's part in its run's services: its builds and joins, recorded; the watcher.

    Made by ``TemplateStore.services()`` on first use: a run that builds no template with
    a teardown never makes one (nor loads this module, teardown.py or psutil).
    """

    def __init__(
        self, layout: Layout, run_id: str, worker: str, controller_pid: int, timeout: float
    ) -> None:
        self.layout = layout
        self.run_id = run_id
        self.worker = worker
        self.controller_pid = controller_pid
        self.timeout = timeout
        self._controller: OwnerRecord | None = None

    def controller(self) -> OwnerRecord:
        """The owner record of the run's controller: its end is the run's end."""
        if self._controller is None:
            self._controller = own_record("controller", self.run_id, self.controller_pid)
        return self._controller

    def begin(self, template: str, tid: str, data: Path, func: Teardown) -> Instance:
        """A build of a template with teardown ``func`` starts in ``data``: record it."""
        # The watcher first: killed after it, the record is found; killed before, no record.
        ensure_running(self.layout, self.run_id, self.controller(), self.timeout)
        return record_building(
            self.layout,
            template=template,
            tid=tid,
            run_id=self.run_id,
            worker=self.worker,
            path=data,
            ref=reference(func, template),
            controller=self.controller(),
        )

    def watch(self, instance: Instance | None) -> contextlib.AbstractContextManager[None]:
        """While a build runs: each service it starts is added to its instance record."""
        if instance is None:
            return contextlib.nullcontext()
        return services.reporting_to(lambda value: add_started(self.layout, instance, value))

    def built(self, instance: Instance, path: Path, value: Any) -> None:
        record_built(self.layout, instance, path, value)

    def join(self, tid: str, meta: Meta) -> bool:
        """This run uses a template with a teardown that another run built: join its users.

        False if that run tore it down meanwhile: the request must start again.
        """
        joined = join(self.layout, tid, self.controller(), meta, self.timeout)
        if joined:
            ensure_running(self.layout, self.run_id, self.controller(), self.timeout)
        return joined is not False


# Popen objects of the watchers this process started: kept so that none is garbage
# collected (with a ResourceWarning) while it runs.
_STARTED: list[subprocess.Popen[bytes]] = []


def ensure_running(layout: Layout, run_id: str, controller: OwnerRecord, timeout: float) -> bool:
    """Start the run's watcher unless a process of the run already did; whether we did."""
    marker = layout.reaper_marker(run_id)
    make_dir(layout.services_root)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    argv = [
        sys.executable,
        "-m",
        "pytest_prewarm.reaper",
        str(layout.root),
        run_id,
        controller.to_json(),
        repr(timeout),
    ]
    log_fd = os.open(
        layout.reaper_log(run_id),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND | O_NOFOLLOW | O_CLOEXEC,
        0o600,
    )
    try:
        # No inherited pipe: an xdist worker talks to its controller over stdin/stdout,
        # and a watcher holding them would keep that channel open.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            close_fds=True,
            **_detached(),
        )
    finally:
        os.close(log_fd)
    _STARTED.append(proc)
    write_atomic(marker, json.dumps({"pid": proc.pid}))
    return True


def _detached() -> dict[str, Any]:
    if sys.platform == "win32":  # pragma: no cover - Windows
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
        return {"creationflags": flags}
    return {"start_new_session": True}


def wait_for_exit(record: OwnerRecord) -> None:
    """Return once the process ``record`` names has exited (at once if it already has)."""
    if sys.platform == "linux" and hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            return
        except OSError:  # pragma: no cover - kernels before 5.3
            _wait_by_handle(record)
            return
        try:
            # The fd pins that process: checked now, a later reuse of the pid cannot fool us.
            if classify(record).state is Liveness.DEAD:
                return
            select.select([fd], [], [])
        finally:
            os.close(fd)
        return
    if sys.platform == "darwin":  # pragma: no cover - exercised by the macOS CI job
        queue = select.kqueue()
        event = select.kevent(
            record.pid,
            filter=select.KQ_FILTER_PROC,
            flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
            fflags=select.KQ_NOTE_EXIT,
        )
        try:
            queue.control([event], 0, 0)
            if classify(record).state is not Liveness.DEAD:
                queue.control(None, 1, None)
        except ProcessLookupError:
            return
        finally:
            queue.close()
        return
    _wait_by_handle(record)  # pragma: no cover - Windows


def _wait_by_handle(record: OwnerRecord) -> None:  # pragma: no cover - Windows, old kernels
    import psutil

    try:
        proc = psutil.Process(record.pid)
        if classify(record).state is not Liveness.DEAD:
            proc.wait()
    except psutil.Error:
        return


def main(argv: list[str]) -> int:
    root, run_id, controller_json, timeout_text = argv
    controller = parse_record(controller_json)
    if controller is None:
        print(f"prewarm reaper: unreadable controller record {controller_json!r}", flush=True)
        return 2
    wait_for_exit(controller)
    layout = Layout(Path(root))
    results = finish(
        layout, run_id, runner=own_record("reaper", run_id), timeout=float(timeout_text)
    )
    for result in results:
        line = f"prewarm reaper: teardown of {result.template!r}: {result.outcome}"
        print(line if result.error is None else f"{line}\n{result.error}", flush=True)
    with contextlib.suppress(OSError):  # a per-run lock dir that its controller removed
        os.unlink(layout.reaper_marker(run_id))
    return 0 if all(r.outcome == OK for r in results) else 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    # Not sys.exit: a teardown that hung lives on in a thread, and must not keep us alive.
    os._exit(code)
