"""The service helper with real processes: detached, logged, ready by port or line, stopped."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pytest_prewarm import services
from pytest_prewarm.services import ServiceError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="sessions and signals are POSIX")

PYTHON = sys.executable

# A server that ignores SIGTERM and has a child of its own: only SIGKILL of the tree ends it.
STUBBORN = """
    import signal, socket, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print("child", child.pid, flush=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    sock.listen()
    print("listening", flush=True)
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_server_is_ready_when_its_port_accepts_and_runs_in_its_own_session(
    tmp_path: Path,
) -> None:
    port = services.free_port()
    argv = [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"]

    value = services.start(argv, tmp_path, name="web", port=port)

    try:
        assert value["port"] == port
        assert value["log"] == str(tmp_path / "web.log")
        assert psutil.Process(value["pid"]).create_time() == value["create_time"]
        assert os.getsid(value["pid"]) != os.getsid(0)  # a worker's Ctrl-C does not reach it
    finally:
        assert services.stop(value) is True
    assert not alive(value["pid"])
    assert services.stop(value) is False  # already gone


def test_a_server_is_ready_when_its_log_shows_the_line(tmp_path: Path) -> None:
    code = (
        "import time; print('booting', flush=True); time.sleep(0.3); "
        "print('READY 7', flush=True); time.sleep(60)"
    )

    started = time.monotonic()
    value = services.start([PYTHON, "-c", code], tmp_path, ready_line=r"^READY \d+$")

    try:
        assert time.monotonic() - started >= 0.3
        assert "READY 7" in (tmp_path / "service.log").read_text()
    finally:
        services.stop(value)


def test_a_server_never_ready_is_stopped_and_the_error_shows_its_log(tmp_path: Path) -> None:
    code = "import time; print('cannot find the config file', flush=True); time.sleep(60)"

    with pytest.raises(ServiceError) as caught:
        services.start([PYTHON, "-c", code], tmp_path, name="db", ready_line="ready", timeout=0.5)

    text = str(caught.value)
    assert "not ready after 0.5 s" in text
    assert "no line of its log matches 'ready'" in text
    assert "cannot find the config file" in text
    assert str(tmp_path / "db.log") in text
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if code in (p.info["cmdline"] or [])]
    assert not [p for p in pids if alive(p)]


def test_a_server_that_exits_early_fails_at_once_with_its_status(tmp_path: Path) -> None:
    code = "import sys; print('port in use', file=sys.stderr); sys.exit(3)"

    started = time.monotonic()
    with pytest.raises(ServiceError, match="exited with status 3 before it was ready") as caught:
        services.start([PYTHON, "-c", code], tmp_path, port=services.free_port(), timeout=30)

    assert time.monotonic() - started < 10
    assert "port in use" in str(caught.value)


def test_a_missing_program_is_a_service_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match=r"cannot start service .*no-such-program"):
        services.start(["/no-such-program"], tmp_path)


def test_stop_kills_the_whole_tree_after_the_grace_period(tmp_path: Path) -> None:
    port = services.free_port()
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(STUBBORN))
    value = services.start([PYTHON, str(script), str(port)], tmp_path, port=port)
    log = (tmp_path / "service.log").read_text()
    child = int(log.split("child ")[1].split()[0])
    assert alive(child)

    started = time.monotonic()
    assert services.stop(value, grace=0.5) is True

    assert time.monotonic() - started >= 0.5  # SIGTERM was ignored for the grace period
    assert not alive(value["pid"])
    assert not alive(child)


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    other = psutil.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        # A value whose pid now belongs to another process: its start time differs.
        stale = {"pid": other.pid, "create_time": other.create_time() - 100.0}

        assert services.stop(stale, sig=signal.SIGKILL) is False

        assert alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_stop_refuses_a_value_that_is_not_from_start() -> None:
    with pytest.raises(ServiceError, match=r"not a value from services\.start"):
        services.stop({"port": 5432})


def test_the_log_tail_is_the_end_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("a" * 10_000 + "THE END")

    assert services.log_tail(log, 100).endswith("THE END")
    assert len(services.log_tail(log, 100)) == 100
    assert services.log_tail(tmp_path / "missing.log") == ""
