"""Running a server from a builder: start it detached and logged, wait until ready, stop it.

``start`` returns a plain dict, the builder's value (or part of it), which holds what
``stop`` needs: the pid with its start time (so a pid that another process has since
taken is never signalled), the port and the log's path. The process runs in a session of
its own: the worker that built it may end, or get Ctrl-C, long before the last test that
uses the server. Only the standard library and psutil; no pytest, no lock dir.

Example, a builder and its teardown::

    from pytest_prewarm import services

    def build_server(path):
        port = services.free_port()
        return services.start(["python", "-m", "http.server", str(port)], path, port=port)

    def stop_server(path, value):
        services.stop(value)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .exceptions import PrewarmError

TAIL_BYTES = 4000  # of the log, in a readiness error
CREATE_TIME_TOLERANCE = 0.005  # as liveness.py: the same process reads the same value

# Popen objects of services this process started; kept so that none is collected (with
# a ResourceWarning) while its service runs.
_STARTED: list[subprocess.Popen[bytes]] = []


# Who hears of each service started in this thread: a build of a template with a teardown,
# so that a builder killed before it returned still has its servers stopped (teardown.py).
_listeners = threading.local()


@contextlib.contextmanager
def reporting_to(listener: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """While the block runs, ``listener(value)`` hears of each service started in this thread."""
    previous = getattr(_listeners, "current", None)
    _listeners.current = listener
    try:
        yield
    finally:
        _listeners.current = previous


class ServiceError(PrewarmError):
    """A service did not start, did not get ready in time, or its value is unusable."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick), for a server to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(log: Path, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of ``log`` as text ("" if it cannot be read)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def start(
    argv: Sequence[str],
    path: Path | str,
    *,
    name: str = "service",
    port: int | None = None,
    host: str = "127.0.0.1",
    ready_line: str | None = None,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    user: str | int | None = None,
) -> dict[str, Any]:
    """Start ``argv`` detached, its output to ``path/<name>.log``; return once it is ready.

    Ready means: ``port`` accepts a TCP connection on ``host``, and ``ready_line`` (a
    regular expression) matches a line of the log, for each one given; with neither, as
    soon as it started. After ``timeout`` s, or if it exits first, it is stopped and
    ``ServiceError`` says why, with the log's tail. ``user`` runs it as another user
    (root only; PostgreSQL refuses to run as root). The returned dict (``pid``,
    ``create_time``, ``port``, ``log``, ``name``) is JSON and is what ``stop`` needs.
    """
    log = Path(path) / f"{name}.log"
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                close_fds=True,
                user=user,
                **_detached(),
            )
        except (OSError, ValueError) as exc:
            raise ServiceError(f"cannot start {name} ({' '.join(argv)}): {exc}") from exc
    _STARTED.append(proc)
    import psutil

    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # it has exited already: the readiness check says so below
        created = 0.0
    value = {"name": name, "pid": proc.pid, "create_time": created, "port": port, "log": str(log)}
    listener = getattr(_listeners, "current", None)
    if listener is not None:
        listener(value)
    pattern = None if ready_line is None else re.compile(ready_line, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        problem = _not_ready(proc, log, host, port, pattern)
        if problem is None:
            return value
        if proc.poll() is not None or time.monotonic() >= deadline:
            if proc.poll() is None:
                stop(value, grace=5.0)
                problem = f"not ready after {timeout:g} s: {problem}"
            raise ServiceError(
                f"{name} ({' '.join(argv)}) {problem}; the end of its log {log}:\n" + log_tail(log)
            )
        time.sleep(0.02)  # a poll of a port or a file: nothing to block on


def _detached() -> dict[str, Any]:
    if sys.platform == "win32":  # pragma: no cover - Windows
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _not_ready(
    proc: subprocess.Popen[bytes],
    log: Path,
    host: str,
    port: int | None,
    pattern: re.Pattern[str] | None,
) -> str | None:
    """Why the service is not ready yet, or ``None`` once it is."""
    code = proc.poll()
    if code is not None:
        return f"exited with status {code} before it was ready"
    if port is not None:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except OSError as exc:
            return f"port {host}:{port} refuses connections ({exc})"
    if pattern is not None and not pattern.search(log_tail(log, 1024 * 1024)):
        return f"no line of its log matches {pattern.pattern!r}"
    return None


def stop(value: Mapping[str, Any], *, grace: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Stop the service ``start`` returned ``value`` for; whether it was still running.

    ``sig`` (SIGTERM by default; PostgreSQL's fast shutdown is SIGINT) goes to the process;
    whatever of its process tree is left after ``grace`` s gets SIGKILL. A pid that now
    belongs to another process (its start time differs) is left alone.
    """
    import psutil

    pid, created = value.get("pid"), value.get("create_time")
    if type(pid) is not int or not isinstance(created, int | float):
        raise ServiceError(f"not a value from services.start (no pid and create_time): {value!r}")
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) > CREATE_TIME_TOLERANCE:
            return False  # the pid was reused: not ours to signal
        # The tree first: once the parent is gone, its children are no longer its children.
        tree = [proc, *proc.children(recursive=True)]
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return False
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return False
    alive = _wait_gone(tree, grace)
    for left in alive:
        with contextlib.suppress(psutil.Error):
            left.kill()
    _wait_gone(alive, 5.0)
    _reap(pid)
    return True


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Those of ``procs`` still running after up to ``timeout`` s.

    A zombie counts as gone: a service whose builder has exited is reaped by whoever
    adopted it, sometimes late, and psutil.wait_procs would wait for that.
    """
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)  # polling: there is no wait for a process that is not our child


def _reap(pid: int) -> None:
    """Collect the exit status if the service is this process's own child (no zombie)."""
    for proc in list(_STARTED):
        if proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            _STARTED.remove(proc)
