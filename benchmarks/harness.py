"""What every benchmark here shares: running pytest as a user would, timing it, summing up.

Only the standard library, so that a benchmark runs with any interpreter. Each script
imports it as ``harness`` (the scripts' own directory is first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

Variant = TypeVar("Variant")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

PYTEST_INI = "[pytest]\naddopts =\n"  # an inner suite's own ini: the repository's stays out


def pytest_env(work: Path, **extra: str) -> dict[str, str]:
    """The environment of an inner pytest run, as a user's shell would give it.

    PYTEST_ADDOPTS, PYTEST_PLUGINS, an outer PYTEST_XDIST_WORKER... would change the run.
    PYTHONDONTWRITEBYTECODE goes too: with it, a package that has no .pyc yet (an editable
    install, such as the plugin's checkout) is compiled from source in every process of
    every run, a cost no real user pays. Bytecode goes to a private prefix instead (nothing
    is written into site-packages or the checkout); a warm-up run fills it.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYTEST_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env.update(extra)
    return env


def children_cpu() -> float:
    """User + system CPU of every reaped descendant so far (pytest reaps its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_group(proc: subprocess.Popen[Any]) -> None:
    # pytest was started in its own session: SIGKILL the whole group so that no xdist worker
    # survives a timed-out run and keeps loading the machine during the next one.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Timed:
    """One process run: exit code (None on timeout), wall and CPU seconds, its output."""

    returncode: int | None
    timed_out: bool
    wall_s: float
    cpu_s: float
    log: Path | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


def run_timed(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log: Path | None = None,
) -> Timed:
    """Run ``cmd`` in its own session, bounded by ``timeout``; measure wall and CPU time.

    CPU time is RUSAGE_CHILDREN around the run: it hardly moves with the load other
    processes put on the machine, so it shows a tool's own cost.
    """
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    timed_out = False
    cpu_before = children_cpu()
    start = time.monotonic()
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except BaseException:
            # Ctrl-C reaches only our process group, not pytest's session: end that run
            # too before the temp dir it works in is removed.
            kill_group(proc)
            raise
    wall = time.monotonic() - start
    cpu = children_cpu() - cpu_before
    return Timed(None if timed_out else proc.returncode, timed_out, wall, cpu, log)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line, one write: lines from concurrent processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by nearest rank, an actual observation; None if empty.

    With 15 values the 90th is the 14th smallest.
    """
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return None


def interleave(rounds: int, variants: list[Variant]) -> Iterable[tuple[int, Variant]]:
    """(round, variant) in the order runs are made: every variant once per round.

    Slow drift of a shared machine then hits every variant alike; the variants' order
    alternates from round to round so none always runs first after a pause.
    """
    for round_no in range(rounds):
        order = variants if round_no % 2 == 0 else list(reversed(variants))
        for variant in order:
            yield round_no, variant


def save_results(name: str, data: dict[str, Any], output: Path | None = None) -> Path:
    """Write raw results to ``output`` or benchmarks/results/<name>-<timestamp>.json."""
    path = output or RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def emit_json(data: dict[str, Any]) -> None:
    """Print the summary as JSON on stdout (``--json``), for the docs' plots."""
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average": load_average(), "python": sys.version}
